"""LLMService: translates kernelmesh.v1 LLM messages to core.llm gateway calls
and back. Failover, limits, budgets and caching all live in the gateway.

Deadlines: the caller's remaining time goes to the gateway, which sizes each
deployment's window from it, so a hung deployment fails over in time.
Cancellation: grpc.aio cancels the handler's task when the client cancels or
its deadline passes; the CancelledError lands inside the gateway's await, and
aiohttp closes the upstream request, so the provider stops generating."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import grpc

from kernelmesh.core.llm import Gateway
from kernelmesh.services import llm_convert as convert
from kernelmesh.services.context import tenant_of
from kernelmesh.services.paging import page_of
from kernelmesh.services.status import rpc, stream_rpc
from kernelmesh.v1 import llm_pb2, llm_pb2_grpc


class LLMServicer(llm_pb2_grpc.LLMServiceServicer):
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    @rpc
    async def Generate(
        self, request: llm_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> llm_pb2.GenerateResponse:
        completion = await self.gateway.generate(
            tenant_of(context),
            request.model,
            convert.messages_from_proto(request.messages),
            convert.options_from_proto(request.options),
            timeout=context.time_remaining(),
        )
        return convert.completion_to_proto(completion)

    @stream_rpc
    async def GenerateStream(
        self, request: llm_pb2.GenerateStreamRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[llm_pb2.GenerateStreamResponse]:
        chunks = self.gateway.stream(
            tenant_of(context),
            request.model,
            convert.messages_from_proto(request.messages),
            convert.options_from_proto(request.options),
            timeout=context.time_remaining(),
        )
        # aclosing: when the call ends early (cancel, deadline, a failed write)
        # the gateway's generator is closed now, not whenever GC finalizes it,
        # so the upstream connection is released at once. A failure after
        # some chunks propagates to stream_rpc, which ends the call with it.
        async with contextlib.aclosing(chunks):
            async for chunk in chunks:
                yield convert.chunk_to_proto(chunk)

    @rpc
    async def Embed(
        self, request: llm_pb2.EmbedRequest, context: grpc.aio.ServicerContext
    ) -> llm_pb2.EmbedResponse:
        embeddings = await self.gateway.embed(
            tenant_of(context),
            request.model,
            list(request.inputs),
            timeout=context.time_remaining(),
        )
        return convert.embeddings_to_proto(embeddings)

    @rpc
    async def ListModels(
        self, request: llm_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> llm_pb2.ListModelsResponse:
        models = self.gateway.models()
        page, token = page_of(models, request.page_token, request.page_size)
        return llm_pb2.ListModelsResponse(
            models=[convert.model_to_proto(m) for m in page], next_page_token=token
        )


__all__ = ["LLMServicer"]
