"""The Gradio demo (`examples/space/app.py`) on the tiny fixture model.

The app is started on 127.0.0.1 (a free port) inside the test session and answered through `gradio_client`
(Generate tab, Understand tab with a streamed multi-turn chat, visible errors for bad input), and a headless
Chromium loads the page, types a prompt, clicks "Generate" and waits for the image. The browser is driven through
the Chrome DevTools Protocol over `--remote-debugging-pipe` (two file descriptors, no extra Python package); the
test is skipped, saying so, only where no Chromium is installed (`.ci/run` installs it: `apt-get install chromium`).
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import re
import select
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest
from example_scripts import load_example
from PIL import Image
from tiny_model import fast_pipeline_dir, free_port, requires_tiny

pytest.importorskip("gradio", reason="the demo needs gradio: pip install -e '.[demo]'")
pytest.importorskip("gradio_client", reason="the demo tests need gradio_client (installed with gradio)")

import gradio as gr  # noqa: E402
from gradio_client import Client, handle_file  # noqa: E402

pytestmark = requires_tiny

ROOT = Path(__file__).resolve().parents[1]
SPACE = ROOT / "examples" / "space"
ROUNDS, DIFFUSION_STEPS = 2, 4


def load_app_module():
    return load_example("space/app.py", "harmon_space_app")


@pytest.fixture(scope="module")
def app():
    return load_app_module()


@pytest.fixture(scope="module")
def server(app):
    """The demo served on 127.0.0.1 for this module: its URL."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    demo = app.build_demo(fast_pipeline_dir(), default_rounds=ROUNDS, default_diffusion_steps=DIFFUSION_STEPS)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, ssr_mode=False)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


@pytest.fixture(scope="module")
def client(server) -> Client:
    return Client(server, verbose=False)


def generate_args(prompt: str = "a red circle", **changes) -> list:
    values = dict(
        prompt=prompt, guidance=3.0, rounds=ROUNDS, temperature=1.0, width=64, height=64, seed=5,
        randomize=False, num_images=2, diffusion_steps=DIFFUSION_STEPS,
    )  # fmt: skip
    values.update(changes)
    return list(values.values())


# ---------------------------------------------------------------------------------------------------------------
# the app object
# ---------------------------------------------------------------------------------------------------------------
def test_build_demo_structure(app):
    demo = app.build_demo(fast_pipeline_dir(), concurrency_limit=2)
    assert isinstance(demo, gr.Blocks)
    fns = {fn.api_name: fn for fn in demo.fns.values() if fn.api_name}
    assert {"generate", "chat"} <= set(fns)
    for name in ("generate", "chat"):
        assert fns[name].concurrency_limit == 2
        assert fns[name].concurrency_id == fns["generate"].concurrency_id  # both tabs share the model's limit
    assert demo._queue.max_size == 32
    config = json.dumps(demo.get_config_file(), default=repr)
    for label in ("Generate", "Understand", "Guidance scale", "MAR rounds", "Temperature", "Width", "Seed"):
        assert label in config, label
    assert "Images per prompt" in config and "Example prompts" in config


def test_model_resolution(app, monkeypatch, tmp_path):
    monkeypatch.setenv("HARMON_MODEL", str(fast_pipeline_dir()))
    assert app.resolve_model(None) == str(fast_pipeline_dir())
    assert app.resolve_model("other") == "other"
    monkeypatch.delenv("HARMON_MODEL")
    from harmon_hf.default_model import DEFAULT_MODEL_DIR

    if (DEFAULT_MODEL_DIR / "model_index.json").is_file():
        assert app.resolve_model(None) == str(DEFAULT_MODEL_DIR)
    else:
        with pytest.raises(FileNotFoundError, match="embedded default model"):
            app.resolve_model(None)
    with pytest.raises(SystemExit) as exc:
        app.main(["--model", str(tmp_path / "missing")])
    assert exc.value.code == 1


def test_space_files():
    readme = (SPACE / "README.md").read_text()
    front = re.match(r"^---\n(.*?)\n---\n", readme, re.S)
    assert front, "README.md needs the Space YAML front matter"
    meta = dict(line.split(":", 1) for line in front.group(1).splitlines() if ":" in line and not line[0].isspace())
    assert meta["sdk"].strip() == "gradio" and meta["app_file"].strip() == "app.py"
    assert meta["sdk_version"].strip().split(".")[0] == gr.__version__.split(".")[0]
    requirements = (SPACE / "requirements.txt").read_text()
    names = {re.split(r"[<>=!~ \[;]", line.strip())[0].lower() for line in requirements.splitlines()}
    block = re.search(r"^dependencies = \[(.*?)^\]", (ROOT / "pyproject.toml").read_text(), re.S | re.M).group(1)
    deps = re.findall(r'^\s*"([^"]+)"', block, re.M)
    assert deps
    for dep in deps:
        assert re.split(r"[<>=!~ \[;]", dep)[0].lower() in names, f"requirements.txt lacks {dep}"
    assert "gradio" in names


# ---------------------------------------------------------------------------------------------------------------
# through gradio_client
# ---------------------------------------------------------------------------------------------------------------
def test_generate_tab(client):
    gallery, seed = client.predict(*generate_args(), api_name="/generate")
    assert seed == 5
    assert [item["caption"] for item in gallery] == ["seed 5", "seed 6"]
    for item in gallery:
        with Image.open(item["image"]) as image:
            assert image.size == (64, 64)
    gallery, seed = client.predict(*generate_args(width=96, height=48, num_images=1), api_name="/generate")
    with Image.open(gallery[0]["image"]) as image:
        assert image.size == (96, 48)
    _, seed = client.predict(*generate_args(randomize=True, num_images=1), api_name="/generate")
    assert isinstance(seed, int) and 0 <= seed < 2**31


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"prompt": "   "}, "Enter a prompt"),
        ({"guidance": 0.5}, "0.5"),
        ({"guidance": 50.0}, "50"),
        ({"width": 72}, "multiple of 16"),
        ({"rounds": 0}, "0"),
        ({"num_images": 9}, "9"),
        ({"temperature": -1.0}, "-1"),
    ],
)
def test_generate_tab_bad_input(client, changes, message):
    with pytest.raises(Exception, match=re.escape(message)) as exc:
        client.predict(*generate_args(**changes), api_name="/generate")
    assert "Traceback" not in str(exc.value)


def test_understand_tab_streams_a_multi_turn_chat(server, tmp_path):
    picture = tmp_path / "picture.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(picture)
    chat = Client(server, verbose=False)  # own session: own conversation
    with pytest.raises(Exception, match="Upload an image first"):
        chat.predict(None, "What is this?", 4, api_name="/chat")
    with pytest.raises(Exception, match="Type a question first"):
        chat.predict(handle_file(str(picture)), "  ", 4, api_name="/chat")
    job = chat.submit(handle_file(str(picture)), "What is this?", 6, api_name="/chat")
    updates = list(job)
    assert len(updates) >= 2, "the answer was not streamed"
    history, cleared = job.result()
    assert cleared == ""
    assert [m["role"] for m in history] == ["user", "assistant"]
    answer = history[-1]["content"]
    assert answer, "empty answer"
    # a follow-up question without a new upload keeps the image and the earlier turn
    history, _ = chat.predict(None, "And its colour?", 4, api_name="/chat")
    assert [m["role"] for m in history] == ["user", "assistant"] * 2
    assert history[0] == job.result()[0][0]
    chat.predict(api_name="/reset")
    with pytest.raises(Exception, match="Upload an image first"):
        chat.predict(None, "What is this?", 4, api_name="/chat")


# ---------------------------------------------------------------------------------------------------------------
# a real browser
# ---------------------------------------------------------------------------------------------------------------
def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


class HeadlessChromium:
    """A headless Chromium driven through the DevTools protocol over `--remote-debugging-pipe` (fds 3 and 4)."""

    def __init__(self, binary: str, profile: Path, log: Path):
        to_browser_r, to_browser_w = os.pipe()
        from_browser_r, from_browser_w = os.pipe()
        # move the child's ends to free fds >= 10 so that the dup2s to 3 and 4 cannot overwrite each other
        child_r = fcntl.fcntl(to_browser_r, fcntl.F_DUPFD_CLOEXEC, 10)
        child_w = fcntl.fcntl(from_browser_w, fcntl.F_DUPFD_CLOEXEC, 10)
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._log = open(log, "wb")  # noqa: SIM115 - closed in close()
        args = [
            binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--remote-debugging-pipe", f"--user-data-dir={profile}", "--no-first-run", "--no-default-browser-check",
            "--disable-extensions", "--disable-background-networking", "--disable-component-update",
            "--window-size=1280,1024", "about:blank",
        ]  # fmt: skip
        devnull = os.open(os.devnull, os.O_RDONLY)
        self.pid = os.posix_spawn(
            binary,
            args,
            os.environ,
            file_actions=[
                (os.POSIX_SPAWN_DUP2, devnull, 0),
                (os.POSIX_SPAWN_DUP2, self._log.fileno(), 1),
                (os.POSIX_SPAWN_DUP2, self._log.fileno(), 2),
                (os.POSIX_SPAWN_DUP2, child_r, 3),
                (os.POSIX_SPAWN_DUP2, child_w, 4),
            ],
        )
        for fd in (devnull, child_r, child_w):
            os.close(fd)
        self._write, self._read = to_browser_w, from_browser_r
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict] = []

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 60) -> dict:
        """Send one command and wait for its result (events that arrive meanwhile are kept in `events`)."""
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._write, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._receive(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def _receive(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no answer from Chromium")
            ready, _, _ = select.select([self._read], [], [], left)
            if ready:
                chunk = os.read(self._read, 1 << 20)
                if not chunk:
                    raise RuntimeError("Chromium closed the DevTools pipe")
                self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=10)
        except Exception:  # already gone
            pass
        for _ in range(50):
            pid, _ = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                break
            time.sleep(0.1)
        else:
            os.kill(self.pid, 9)
            os.waitpid(self.pid, 0)
        os.close(self._write)
        os.close(self._read)
        self._log.close()


# Page helpers: wait for a condition, type into a gradio textbox, click a button, read the error toasts.
PAGE_HELPERS = r"""
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const until = async (fn, ms, what) => {
  const end = Date.now() + ms;
  while (Date.now() < end) { const v = fn(); if (v) return v; await sleep(200); }
  throw new Error("timed out waiting for " + what);
};
const toasts = () => Array.from(document.querySelectorAll("[class*='toast']")).map((e) => e.innerText).join(" | ");
const type = async (text) => {
  const box = await until(() => document.querySelector("#prompt textarea"), 60000, "the prompt box");
  const setter = Object.getOwnPropertyDescriptor(HTMLTextAreaElement.prototype, "value").set;
  setter.call(box, text);
  box.dispatchEvent(new Event("input", { bubbles: true }));
  await sleep(300);
  return box;
};
const clickGenerate = async () => {
  const button = await until(() => {
    const el = document.querySelector("#generate-button");
    return el && (el.tagName === "BUTTON" ? el : el.querySelector("button"));
  }, 10000, "the Generate button");
  button.click();
};
"""

# Types the prompt, clicks Generate and waits for the gallery to show a decoded image (failing on an error toast).
SUBMIT_AND_WAIT = r"""
const box = await type(PROMPT);
await clickGenerate();
const img = await until(() => {
  if (/error/i.test(toasts())) throw new Error("error shown: " + toasts());
  const el = document.querySelector("#gallery img");
  return el && el.complete && el.naturalWidth > 0 ? el : null;
}, 240000, "the generated image");
return { src: img.src, width: img.naturalWidth, height: img.naturalHeight, prompt: box.value };
"""

# An empty prompt: the page must show the app's message.
SUBMIT_EMPTY = r"""
await type("");
await clickGenerate();
return await until(() => (/Enter a prompt/.test(toasts()) ? toasts() : null), 60000, "the error message");
"""


def evaluate(browser: HeadlessChromium, session: str, script: str, timeout: float = 300) -> dict:
    """Run the body of an async page function (with `PAGE_HELPERS`); its value, or `{"error": text}` if it threw."""
    expression = "(async () => {\n" + PAGE_HELPERS + script + "\n})()"
    result = browser.send(
        "Runtime.evaluate",
        {"expression": expression, "awaitPromise": True, "returnByValue": True, "timeout": int(timeout * 1000)},
        session=session,
        timeout=timeout + 30,
    )
    if "exceptionDetails" in result:
        details = result["exceptionDetails"]
        return {"error": details.get("exception", {}).get("description") or details.get("text")}
    return result["result"]["value"]


@pytest.mark.slow
def test_browser_generates_an_image(server, tmp_path):
    binary = find_chromium()
    if binary is None:
        pytest.skip("Chromium is not installed (apt-get install chromium); .ci/run installs it")
    if sys.platform != "linux":
        pytest.skip("the DevTools-pipe driver uses POSIX file descriptors (Linux)")
    profile = Path(tempfile.mkdtemp(prefix="chromium-profile-", dir=tmp_path))
    browser = HeadlessChromium(binary, profile, tmp_path / "chromium.log")
    try:
        target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        browser.send("Page.enable", session=session)
        browser.send("Page.navigate", {"url": server}, session=session)
        value = evaluate(browser, session, SUBMIT_AND_WAIT.replace("PROMPT", json.dumps("a red circle")))
        message = evaluate(browser, session, SUBMIT_EMPTY, timeout=90) if "error" not in value else None
        shot = browser.send("Page.captureScreenshot", {"format": "png"}, session=session)
        (tmp_path / "page.png").write_bytes(base64.b64decode(shot["data"]))
    finally:
        browser.close()
    if "error" in value:
        pytest.fail(f"in the page: {value['error']} (screenshot {tmp_path / 'page.png'})")
    assert value["prompt"] == "a red circle"
    assert value["width"] > 0 and value["height"] > 0
    assert server.rstrip("/") in value["src"] or value["src"].startswith(("blob:", "data:"))
    assert isinstance(message, str) and "Enter a prompt" in message, message
