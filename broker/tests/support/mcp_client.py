"""Drives `airlock mcp` with the MCP project's own Python client.

argv: AIRLOCK_BINARY SOCKET. Prints one JSON object with what it saw.
"""

import asyncio
import json
import sys

from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client


def payload(result):
    is_error = getattr(result, "is_error", None)
    if is_error is None:
        is_error = getattr(result, "isError", False)
    text = result.content[0].text
    try:
        return is_error, json.loads(text)
    except ValueError:
        return is_error, text


async def main():
    exe, sock = sys.argv[1], sys.argv[2]
    params = StdioServerParameters(command=exe, args=["--socket", sock, "mcp"], env={})
    seen = {}
    async with stdio_client(params) as (read, write):
        async with ClientSession(read, write) as s:
            init = await s.initialize()
            info = getattr(init, "server_info", None) or getattr(init, "serverInfo")
            seen["server"] = info.name
            tools = await s.list_tools()
            seen["tools"] = sorted(t.name for t in tools.tools)
            _, created = payload(await s.call_tool("sandbox_create", {}))
            sid = created["sandbox"]
            err, wrote = payload(await s.call_tool(
                "write_file", {"sandbox": sid, "path": "/workspace/mcp.txt", "content": "from mcp\n"}))
            seen["write_error"] = err
            _, ran = payload(await s.call_tool(
                "run_command", {"sandbox": sid, "command": "cat /workspace/mcp.txt; echo made > /workspace/made.txt; exit 4"}))
            seen["run"] = ran
            _, read = payload(await s.call_tool("read_file", {"sandbox": sid, "path": "/workspace/made.txt"}))
            seen["read"] = read["content"]
            _, listed = payload(await s.call_tool("list_files", {"sandbox": sid, "path": "/workspace"}))
            seen["listed"] = sorted(e["name"] for e in listed if e["name"] in ("mcp.txt", "made.txt"))
            err, missing = payload(await s.call_tool("read_file", {"sandbox": sid, "path": "/workspace/nope"}))
            seen["missing"] = [err, missing]
            _, big = payload(await s.call_tool(
                "run_command", {"sandbox": sid, "command": "head -c 100000 /dev/zero | tr '\\\\0' x", "max_output_bytes": 1000}))
            seen["big_len"] = len(big["stdout"])
            _, snap = payload(await s.call_tool("snapshot", {"sandbox": sid, "name": "m1"}))
            seen["snapshot"] = snap["name"]
            _, rows = payload(await s.call_tool("audit", {"sandbox": sid, "kind": "exec"}))
            seen["audit_exits"] = sum(1 for r in rows if r["action"] == "exit")
            _, gone = payload(await s.call_tool("sandbox_destroy", {"sandbox": sid}))
            seen["destroyed"] = gone["destroyed"] == sid
    print(json.dumps(seen))


asyncio.run(main())
