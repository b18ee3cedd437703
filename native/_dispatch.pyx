# cython: boundscheck=False, wraparound=False, initializedcheck=False, cdivision=True
"""The ready queue: strict priority between levels, round-robin between
tenants within a level, FIFO per tenant within a level.

Layout (all O(1) per operation except the priority lookup, O(log levels)):

* Every queued task is a node in one pool (`_nodes`, a vector with a free
  list), linked into the doubly-linked FIFO of its (priority, tenant) slot, so
  `remove` unlinks it in place.
* A slot is the queue of one tenant at one priority level. Slots that hold
  live tasks are linked into their level's ring, a circular doubly-linked list
  whose head is the tenant that pops next; "pop, then go to the tail" is just
  moving the head one step. A slot leaves its ring (and is freed) the moment
  its last task pops or is removed, so a later push puts the tenant at the
  tail, exactly as the specification says.
* `_levels` maps priority to the level's ring head (-1: empty) and `_top`
  points at the highest non-empty level, the one that pops next. A level that
  empties stays in the map (a node allocation saved when its priority comes
  back, the usual case with a few fixed priorities); at most
  KEEP_EMPTY_LEVELS of them beyond the live ones, which bounds the work per
  operation to O(1) amortised.
* Task id -> node and (priority, tenant) -> slot are flat open-addressing
  hash tables (`IdMap`: linear probing, backward-shift deletion, Fibonacci
  hashing): a lookup is usually one cache line, and once the tables and pools
  have grown, push and pop allocate nothing.

The pure-Python `ReferenceReadyQueue` in tests/native/test_dispatch.py defines
the order; the tests check this class against it step by step.
"""

from cpython.number cimport PyIndex_Check
from cython.operator cimport dereference as deref, predecrement as dec, preincrement as inc
from libcpp.map cimport map as cmap
from libcpp.utility cimport pair
from libcpp.vector cimport vector

cimport cython

ctypedef unsigned long long u64
ctypedef long long i64

# Empty priority levels kept in `_levels` for reuse (see `_level_emptied`).
cdef enum:
    KEEP_EMPTY_LEVELS = 8
    # An emptied queue whose pools grew past this many tasks gives the memory
    # back (pop, remove); drain always does.
    RELEASE_ABOVE = 4096


cdef struct Node:
    long long task_id
    int next        # next (younger) node of the same slot, -1 at the tail
    int prev        # previous (older) node of the same slot, -1 at the head
    int slot        # owning slot; for a free node, unused


cdef struct Slot:
    int head        # oldest live node, -1 when free
    int tail        # youngest live node
    int ring_next   # next slot in the level's ring (circular)
    int ring_prev
    int tenant
    int priority
    Py_ssize_t count


cdef inline i64 _slot_key(int priority, int tenant) noexcept nogil:
    return <i64>(((<u64><unsigned int>priority) << 32) | <u64><unsigned int>tenant)


cdef struct Bucket:
    i64 key
    int val         # -1: empty


cdef cppclass IdMap:
    """i64 -> non-negative int. Open addressing with linear probing at most
    half full; deletion shifts the following run back, so there are no
    tombstones. Growing allocates, so it happens in `_idmap_reserve` (where
    Cython turns std::bad_alloc into MemoryError); every method here is
    noexcept."""

    vector[Bucket] buckets   # size 0 or a power of two
    size_t count
    int shift                # 64 - log2(buckets.size())

    __init__():
        this.count = 0
        this.shift = 64

    inline size_t home(i64 key) noexcept:
        return <size_t>((<u64>key * <u64>0x9E3779B97F4A7C15) >> this.shift)

    inline bint needs_room() noexcept:
        return (this.count + 1) * 2 > this.buckets.size()

    inline int find(i64 key) noexcept:
        if this.count == 0:
            return -1
        cdef size_t mask = this.buckets.size() - 1
        cdef size_t i = this.home(key)
        while this.buckets[i].val != -1:
            if this.buckets[i].key == key:
                return this.buckets[i].val
            i = (i + 1) & mask
        return -1

    inline int insert(i64 key, int val) noexcept:
        """Inserts and returns -1, or returns the value already there.
        Precondition: not needs_room()."""
        cdef size_t mask = this.buckets.size() - 1
        cdef size_t i = this.home(key)
        while this.buckets[i].val != -1:
            if this.buckets[i].key == key:
                return this.buckets[i].val
            i = (i + 1) & mask
        this.buckets[i].key = key
        this.buckets[i].val = val
        this.count += 1
        return -1

    inline int erase(i64 key) noexcept:
        """Removes `key`; its value, or -1 if it was absent."""
        if this.count == 0:
            return -1
        cdef size_t mask = this.buckets.size() - 1
        cdef size_t i = this.home(key)
        while True:
            if this.buckets[i].val == -1:
                return -1
            if this.buckets[i].key == key:
                break
            i = (i + 1) & mask
        cdef int val = this.buckets[i].val
        cdef size_t j = i
        cdef size_t h
        while True:
            j = (j + 1) & mask
            if this.buckets[j].val == -1:
                break
            h = this.home(this.buckets[j].key)
            # Move j's entry into the hole at i unless its home lies
            # cyclically in (i, j], where it must stay to remain reachable.
            if ((j - h) & mask) >= ((j - i) & mask):
                this.buckets[i] = this.buckets[j]
                i = j
        this.buckets[i].val = -1
        this.count -= 1
        return val

    void adopt(vector[Bucket]& fresh) noexcept:
        """Moves every entry into `fresh` (empty, power-of-two sized,
        large enough), which becomes the table; `fresh` gets the old one."""
        cdef int bits = 0
        while (<size_t>1 << bits) < fresh.size():
            bits += 1
        this.buckets.swap(fresh)
        this.shift = 64 - bits
        this.count = 0
        cdef size_t k
        for k in range(fresh.size()):
            if fresh[k].val != -1:
                this.insert(fresh[k].key, fresh[k].val)


cdef int _idmap_reserve(IdMap* m) except -1:
    """Room for one more entry: doubles the table at half full."""
    if not m.needs_room():
        return 0
    cdef vector[Bucket] fresh
    fresh.resize(max(<size_t>16, m.buckets.size() * 2), Bucket(0, -1))
    m.adopt(fresh)
    return 0


cdef void _idmap_clear(IdMap* m) noexcept:
    """Empty, with no table at all (the next insert makes the smallest)."""
    cdef vector[Bucket] none
    m.buckets.swap(none)
    m.count = 0
    m.shift = 64  # unused until the next _idmap_reserve


cdef class ReadyQueue:
    """Tasks waiting for a device, popped highest priority first and fairly
    (round-robin) between tenants within one priority."""

    cdef vector[Node] _nodes
    cdef int _free_node
    cdef vector[Slot] _slots
    cdef int _free_slot
    cdef IdMap _index                   # task id -> node
    cdef IdMap _slot_of                 # (priority, tenant) -> slot
    cdef cmap[int, int] _levels         # priority -> ring head slot, -1: empty
    cdef cmap[int, int].iterator _top   # highest non-empty level, or end()
    cdef Py_ssize_t _empty_levels
    cdef vector[Py_ssize_t] _tenant_live
    cdef dict _tenant_ids               # tenant name -> small int
    cdef list _tenant_names             # small int -> tenant name

    def __cinit__(self):
        self._free_node = -1
        self._free_slot = -1
        self._top = self._levels.end()
        self._empty_levels = 0
        self._tenant_ids = {}
        self._tenant_names = []

    def __init__(self) -> None:
        pass

    # -- Python API (thin) -------------------------------------------------

    def push(self, long long task_id, str tenant not None, int priority) -> None:
        """Queues `task_id` for `tenant` at `priority`; ValueError if it is
        already queued."""
        cdef object tid = self._tenant_ids.get(tenant)
        if tid is None:
            tid = self._intern(tenant)
        self._push(task_id, <int>tid, priority)

    def pop(self) -> int:
        """The next task id; IndexError when the queue is empty."""
        if self._index.count == 0:
            raise IndexError("pop from an empty ReadyQueue")
        cdef i64 task_id = self._pop()
        if self._index.count == 0 and self._nodes.size() > RELEASE_ABOVE:
            self._release()
        return task_id

    def remove(self, long long task_id) -> bool:
        """True if `task_id` was queued (and is now gone), False otherwise."""
        cdef int n = self._index.erase(task_id)
        if n == -1:
            return False
        self._unlink(n)
        if self._index.count == 0 and self._nodes.size() > RELEASE_ABOVE:
            self._release()
        return True

    def drain(self) -> list:
        """Every queued id in pop order, leaving the queue empty."""
        cdef list out = []
        while self._index.count:
            out.append(self._pop())
        self._release()
        return out

    def __len__(self) -> int:
        return self._index.count

    def __contains__(self, task_id) -> bool:
        cdef long long key
        if not PyIndex_Check(task_id):
            return False
        try:
            key = task_id
        except OverflowError:
            return False
        return self._index.find(key) != -1

    def depth_by_tenant(self) -> dict:
        """Live queued tasks per tenant; tenants with none are omitted."""
        cdef dict out = {}
        cdef Py_ssize_t i
        for i in range(<Py_ssize_t>self._tenant_live.size()):
            if self._tenant_live[i]:
                out[self._tenant_names[i]] = self._tenant_live[i]
        return out

    def __repr__(self) -> str:
        cdef Py_ssize_t levels = self._levels.size() - self._empty_levels
        return f"<ReadyQueue {self._index.count} tasks, {levels} priority levels>"

    # -- internals ---------------------------------------------------------

    @cython.final
    cdef object _intern(self, str tenant):
        cdef Py_ssize_t tid = len(self._tenant_names)
        if tid > 0x7FFFFFFF:
            raise OverflowError("too many distinct tenants for a ReadyQueue")
        self._tenant_live.push_back(0)
        self._tenant_names.append(tenant)
        self._tenant_ids[tenant] = tid
        return tid

    @cython.final
    cdef int _push(self, i64 task_id, int tenant, int priority) except -1:
        # Everything that can fail (allocation, the duplicate check) comes
        # before the first change that would need undoing.
        _idmap_reserve(&self._index)
        if self._index.find(task_id) != -1:
            raise ValueError(f"task {task_id} is already queued")
        cdef int n = self._alloc_node()
        cdef int s
        try:
            s = self._slot_for(priority, tenant)
        except BaseException:
            self._free_node_at(n)
            raise
        self._index.insert(task_id, n)
        cdef Node* node = &self._nodes[n]
        cdef Slot* slot = &self._slots[s]
        node.task_id = task_id
        node.slot = s
        node.next = -1
        node.prev = slot.tail
        if slot.tail == -1:
            slot.head = n
        else:
            self._nodes[slot.tail].next = n
        slot.tail = n
        slot.count += 1
        self._tenant_live[tenant] += 1
        return 0

    @cython.final
    cdef i64 _pop(self) noexcept:
        # Precondition: not empty, so `_top` is a level with a non-empty ring.
        cdef cmap[int, int].iterator lv = self._top
        cdef int s = deref(lv).second
        cdef int n = self._slots[s].head
        cdef i64 task_id = self._nodes[n].task_id
        self._index.erase(task_id)
        # The head tenant goes to the tail, or leaves the ring if this was its
        # last task here; either way its ring successor pops next. `_unlink`
        # handles leaving; staying is one step of the head.
        if self._slots[s].count > 1:
            deref(lv).second = self._slots[s].ring_next
        self._unlink(n)
        return task_id

    @cython.final
    cdef void _unlink(self, int n) noexcept:
        """Takes live node `n` out of its slot (its index entry is already
        gone); frees the slot, and the level, when they empty."""
        cdef Node* node = &self._nodes[n]
        cdef int s = node.slot
        cdef Slot* slot = &self._slots[s]
        if node.prev == -1:
            slot.head = node.next
        else:
            self._nodes[node.prev].next = node.next
        if node.next == -1:
            slot.tail = node.prev
        else:
            self._nodes[node.next].prev = node.prev
        self._free_node_at(n)
        slot.count -= 1
        self._tenant_live[slot.tenant] -= 1
        if slot.count == 0:
            self._drop_slot(s)

    @cython.final
    cdef void _drop_slot(self, int s) noexcept:
        """Slot `s` has no live tasks: out of its ring, back to the pool."""
        cdef Slot* slot = &self._slots[s]
        cdef cmap[int, int].iterator lv = self._levels.find(slot.priority)
        if slot.ring_next == s:
            deref(lv).second = -1
            self._level_emptied(lv)
        else:
            self._slots[slot.ring_prev].ring_next = slot.ring_next
            self._slots[slot.ring_next].ring_prev = slot.ring_prev
            if deref(lv).second == s:
                deref(lv).second = slot.ring_next
        self._slot_of.erase(_slot_key(slot.priority, slot.tenant))
        slot.head = -1
        slot.tail = -1
        slot.ring_next = self._free_slot
        self._free_slot = s

    @cython.final
    cdef void _level_emptied(self, cmap[int, int].iterator lv) noexcept:
        """Level `lv` just lost its last task. It stays in the map for reuse;
        if it was the top, the top moves down to the next non-empty level.
        Up to KEEP_EMPTY_LEVELS empty levels are kept and stepped over; past
        that, the top erases the empty levels it passes, so a step costs
        O(KEEP_EMPTY_LEVELS) plus erasures, each paid for by an emptying."""
        cdef cmap[int, int].iterator it = lv
        cdef cmap[int, int].iterator below
        self._empty_levels += 1
        if lv == self._top:
            while it != self._levels.begin():
                below = it
                dec(below)
                if deref(below).second != -1:
                    self._top = below
                    break
                if self._empty_levels > KEEP_EMPTY_LEVELS:
                    self._levels.erase(below)
                    self._empty_levels -= 1
                else:
                    it = below
            else:
                self._top = self._levels.end()
        if (
            self._empty_levels > KEEP_EMPTY_LEVELS
            and 2 * self._empty_levels > <Py_ssize_t>self._levels.size()
        ):
            self._sweep_levels()

    @cython.final
    cdef void _sweep_levels(self) noexcept:
        """Erases every empty level; `_top` is not empty, so stays valid."""
        cdef cmap[int, int].iterator it = self._levels.begin()
        while it != self._levels.end():
            if deref(it).second == -1:
                it = self._levels.erase(it)
            else:
                inc(it)
        self._empty_levels = 0

    @cython.final
    cdef int _alloc_node(self) except -1:
        cdef int n = self._free_node
        if n != -1:
            self._free_node = self._nodes[n].next
            return n
        if self._nodes.size() >= 0x7FFFFFFF:
            raise MemoryError("ReadyQueue is full")
        self._nodes.push_back(Node(0, -1, -1, -1))
        return <int>self._nodes.size() - 1

    @cython.final
    cdef inline void _free_node_at(self, int n) noexcept:
        self._nodes[n].next = self._free_node
        self._free_node = n

    @cython.final
    cdef int _slot_for(self, int priority, int tenant) except -1:
        """The slot of (priority, tenant), created at the tail of the level's
        ring (creating the level) when the tenant has no live task there."""
        cdef i64 key = _slot_key(priority, tenant)
        cdef int s = self._slot_of.find(key)
        if s != -1:
            return s
        _idmap_reserve(&self._slot_of)
        s = self._free_slot
        if s != -1:
            self._free_slot = self._slots[s].ring_next
        else:
            if self._slots.size() >= 0x7FFFFFFF:
                raise MemoryError("ReadyQueue has too many tenant slots")
            self._slots.push_back(Slot(-1, -1, -1, -1, -1, 0, 0))
            s = <int>self._slots.size() - 1
        cdef pair[cmap[int, int].iterator, bint] lv
        try:
            lv = self._levels.insert(pair[int, int](priority, s))
        except BaseException:
            self._slots[s].ring_next = self._free_slot
            self._free_slot = s
            raise
        self._slot_of.insert(key, s)
        cdef cmap[int, int].iterator level = lv.first
        cdef Slot* slot = &self._slots[s]
        slot.head = -1
        slot.tail = -1
        slot.tenant = tenant
        slot.priority = priority
        slot.count = 0
        cdef int head = deref(level).second
        if not lv.second and head == -1:
            # An empty level kept for reuse.
            deref(level).second = s
            self._empty_levels -= 1
        if lv.second or head == -1:
            slot.ring_next = s
            slot.ring_prev = s
            if self._top == self._levels.end() or priority > deref(self._top).first:
                self._top = level
        else:
            # Join the ring at the tail, i.e. just before the head.
            slot.ring_next = head
            slot.ring_prev = self._slots[head].ring_prev
            self._slots[slot.ring_prev].ring_next = s
            self._slots[head].ring_prev = s
        return s

    @cython.final
    cdef void _release(self) noexcept:
        """Once empty, gives back what a burst grew, so that a queue that once
        held a million tasks does not keep their memory."""
        if self._index.count:
            return
        cdef vector[Node] no_nodes
        cdef vector[Slot] no_slots
        self._nodes.swap(no_nodes)
        self._slots.swap(no_slots)
        self._free_node = -1
        self._free_slot = -1
        self._levels.clear()
        self._top = self._levels.end()
        self._empty_levels = 0
        _idmap_clear(&self._index)
        _idmap_clear(&self._slot_of)
