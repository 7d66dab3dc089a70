"""A hand-written MCP server over stdio (JSON lines), whose every answer a test scripts through files.

Run as `python raw.py`; state lives in the directory named by RAW_STATE:
- `tools.json` (read at each start): the `tools/list` answer's `tools` array, sent as written, so a
  test can offer any name, description, schema or annotations, and change them between starts;
- `calls.log`: one line per `tools/call` received (`name <canonical JSON arguments>`), appended
  *before* answering, so a test counts what the server received across crashes;
- `starts.log`: one line per start (the pid);
- `behaviour.json` (read at each call): tool name -> what to do: `{"content": [...]}` (the result's
  content, default a text echoing the arguments), `"is_error": true`, `"hang": true` (never answer),
  `"exit": N` (exit with status N before answering), `"garbage": "text"` (write this line to stdout
  first), `"stderr": "text"` (write this line to stderr first);
- `crash_initialize`: while this file exists, the server exits on `initialize`;
- `hang_list`: while this file exists, `tools/list` is never answered;
- `notify_on_call` (a tool name): after answering a call of that tool, the server sends
  `notifications/tools/list_changed` on the connection, as a handshake-era server does.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path
from typing import Any

STATE = Path(os.environ.get("RAW_STATE", "."))
_OUT = threading.Lock()


def _read(name: str, default: Any) -> Any:
    path = STATE / name
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else default


def _log(name: str, line: str) -> None:
    with (STATE / name).open("a", encoding="utf-8") as f:
        f.write(line + "\n")


def _write(line: str) -> None:
    with _OUT:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def _send(message: dict[str, Any]) -> None:
    _write(json.dumps(message, ensure_ascii=False))


def _call(request_id: Any, params: dict[str, Any]) -> None:
    name, arguments = params.get("name"), params.get("arguments") or {}
    _log("calls.log", f"{name} {json.dumps(arguments, sort_keys=True, ensure_ascii=False)}")
    act = _read("behaviour.json", {}).get(name, {})
    if "stderr" in act:
        sys.stderr.write(act["stderr"] + "\n")
        sys.stderr.flush()
    if "garbage" in act:
        _write(act["garbage"])
    if "exit" in act:
        os._exit(act["exit"])
    if act.get("hang"):
        return
    content = act.get("content", [{"type": "text", "text": f"{name} ran with {json.dumps(arguments, sort_keys=True)}"}])
    _send({"jsonrpc": "2.0", "id": request_id, "result": {"content": content, "isError": bool(act.get("is_error"))}})
    notify = STATE / "notify_on_call"
    if notify.exists() and notify.read_text() == name:
        _send({"jsonrpc": "2.0", "method": "notifications/tools/list_changed"})


def main() -> None:
    _log("starts.log", str(os.getpid()))
    for line in sys.stdin:
        if not line.strip():
            continue
        message = json.loads(line)
        method, request_id = message.get("method"), message.get("id")
        if request_id is None:
            continue  # a notification
        if method == "initialize":
            if (STATE / "crash_initialize").exists():
                os._exit(7)
            version = message["params"].get("protocolVersion", "2025-06-18")
            result = {
                "protocolVersion": version,
                "capabilities": {"tools": {"listChanged": True}},
                "serverInfo": {"name": "raw", "version": "1"},
            }
            _send({"jsonrpc": "2.0", "id": request_id, "result": result})
        elif method == "tools/list":
            if (STATE / "hang_list").exists():
                continue
            _send({"jsonrpc": "2.0", "id": request_id, "result": {"tools": _read("tools.json", [])}})
        elif method == "tools/call":
            threading.Thread(target=_call, args=(request_id, message.get("params") or {}), daemon=True).start()
        elif method == "ping":
            _send({"jsonrpc": "2.0", "id": request_id, "result": {}})
        else:
            _send({"jsonrpc": "2.0", "id": request_id, "error": {"code": -32601, "message": f"no method {method}"}})


if __name__ == "__main__":
    main()
