"""Print the API prompt that ComfyUI's own frontend makes from a UI-format workflow.

    python frontend_prompt.py http://127.0.0.1:8188 workflow.json

Opens the server's frontend in headless Chromium, loads the workflow with
`app.loadGraphData` and prints `app.graphToPrompt().output` as JSON. Talks to
Chromium over the DevTools protocol with aiohttp, so run it with ComfyUI's Python.
"""

import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

import aiohttp


async def frontend_prompt(server: str, workflow: str, port: int = 9333) -> dict:
    profile = tempfile.mkdtemp(prefix="adt-chromium-")
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or "chromium"
    chrome = subprocess.Popen(
        [browser, "--headless=new", "--no-sandbox", "--disable-gpu", f"--remote-debugging-port={port}",
         f"--user-data-dir={profile}", server + "/"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(60):
            try:
                targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json").read())
                page = next(t for t in targets if t["type"] == "page")
                break
            except Exception:  # noqa: BLE001 - the browser is still starting
                time.sleep(1)
        async with aiohttp.ClientSession() as session, session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            counter = 0

            async def evaluate(expression: str):
                nonlocal counter
                counter += 1
                params = {"expression": expression, "awaitPromise": True, "returnByValue": True}
                await ws.send_json({"id": counter, "method": "Runtime.evaluate", "params": params})
                while True:
                    message = await ws.receive_json()
                    if message.get("id") == counter:
                        if "exceptionDetails" in message["result"]:
                            raise RuntimeError(json.dumps(message["result"]["exceptionDetails"])[:2000])
                        return message["result"]["result"].get("value")

            for _ in range(120):
                if await evaluate("!!(window.app && window.app.graph)"):
                    break
                await asyncio.sleep(1)
            script = f"(async () => {{ await window.app.loadGraphData({workflow}); return JSON.stringify((await window.app.graphToPrompt()).output); }})()"
            return json.loads(await evaluate(script))
    finally:
        chrome.terminate()
        chrome.wait(timeout=30)
        shutil.rmtree(profile, ignore_errors=True)


if __name__ == "__main__":
    with open(sys.argv[2], encoding="utf-8") as handle:
        print(json.dumps(asyncio.run(frontend_prompt(sys.argv[1], handle.read()))))
