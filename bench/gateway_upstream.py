"""A fake OpenAI upstream for bench/bench_gateway.py: `python bench/gateway_upstream.py PORT`.

`POST /v1/chat/completions`: a ~1 KB JSON answer with usage, or with `"stream": true` 20 SSE chunks
and a usage chunk. Checks the key (`Bearer sk-bench`): 401 otherwise.
"""

from __future__ import annotations

import json
import sys

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

USAGE = {"prompt_tokens": 120, "completion_tokens": 40, "total_tokens": 160, "prompt_tokens_details": {"cached_tokens": 64}}
ANSWER = {"id": "c1", "object": "chat.completion", "created": 0, "model": "gpt-bench", "usage": USAGE,
          "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "x" * 800}}]}
CHUNKS = [f"data: {json.dumps({'id': 'c1', 'object': 'chat.completion.chunk', 'choices': [{'index': 0, 'delta': {'content': 'token '}}]})}\n\n".encode()] * 20
LAST = f"data: {json.dumps({'id': 'c1', 'object': 'chat.completion.chunk', 'choices': [], 'usage': USAGE})}\n\ndata: [DONE]\n\n".encode()


async def chat(request: Request) -> Response:
    body = await request.json()
    if request.headers.get("authorization") != "Bearer sk-bench":
        return JSONResponse({"error": {"message": "bad key"}}, 401)
    if not body.get("stream"):
        return JSONResponse(ANSWER)

    async def chunks():
        for chunk in CHUNKS:
            yield chunk
        yield LAST

    return StreamingResponse(chunks(), media_type="text/event-stream")


app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])

if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", access_log=False)
