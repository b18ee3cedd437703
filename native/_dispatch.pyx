cdef class _Probe:
    pass
