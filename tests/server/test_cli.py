"""`tandem serve`: help text, flag / config-file precedence, and the real command in a subprocess."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from tandem.cli import main, parse_args
from tandem.worker.process import free_port  # below the ephemeral range: the process binds it later


def test_help_reads_well(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    top = capsys.readouterr().out
    assert "serve" in top and "serve a model over the OpenAI API" in top
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = capsys.readouterr().out
    for flag in ("--host", "--port", "--api-key", "--served-model-name", "--max-model-len", "--dtype", "--block-size",
                 "--enable-prefix-caching, --no-enable-prefix-caching", "--max-num-seqs", "--max-num-batched-tokens",
                 "--chat-template", "--chat-template-content-format", "--response-role", "--generation-config",
                 "--disable-log-requests", "--enable-request-id-headers", "--allowed-origins", "--uvicorn-log-level",
                 "--config FILE.yaml"):
        assert flag in text, flag
    assert "(default: 8000)" in text


def test_config_file_precedence(tmp_path):
    cfg = tmp_path / "serve.yaml"
    cfg.write_text("model: /models/x\nport: 9001\nmax-model-len: 256\nserved_model_name: foo\n"
                   "enable-prefix-caching: false\nallowed-origins: [http://a, http://b]\n"
                   "chat-template-content-format: openai\n")
    _, args = parse_args(["serve", "--config", str(cfg), "--port", "9002"])
    assert args.port == 9002  # command line beats the file
    assert args.max_model_len == 256 and args.served_model_name == ["foo"] and args.model == "/models/x"
    assert args.enable_prefix_caching is False and args.allowed_origins == ["http://a", "http://b"]
    assert args.chat_template_content_format == "openai"
    assert args.host == "0.0.0.0" and args.max_num_seqs == 256  # defaults where neither says
    _, args = parse_args(["serve", "/models/y", "--config", str(cfg), "--enable-prefix-caching"])
    assert args.model == "/models/y" and args.enable_prefix_caching is True
    _, args = parse_args(["serve", "--allowed-origins", '["http://c"]'])
    assert args.allowed_origins == ["http://c"] and args.port == 8000
    cfg.write_text('enable-request-id-headers: "false"\ndisable-log-requests: "yes"\n')  # switches, as strings
    _, args = parse_args(["serve", "--config", str(cfg)])
    assert args.enable_request_id_headers is False and args.disable_log_requests is True
    for bad in ("nonsense-flag: 1\n", "chat-template-content-format: xml\n", "- just a list\n", "port: abc\n",
                "enable-request-id-headers: maybe\n", "port: 70000\n"):
        cfg.write_text(bad)
        with pytest.raises(SystemExit):
            parse_args(["serve", "--config", str(cfg)])
    with pytest.raises(SystemExit):
        parse_args(["serve", "--port", "-1"])


@pytest.mark.parametrize("argv, words", [
    (["generate", "/nonexistent", "--prompt", "hi"], "neither a local Hugging Face folder"),
    (["generate", "--max-tokens", "0", "--prompt", "hi"], "max_tokens must be an integer >= 1"),
])
def test_bad_input_at_the_command_line_is_one_line(argv, words, capsys):
    """As `tandem serve` does: one error line and exit status 2, no traceback."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    assert err[-1].startswith("tandem generate: error:") and words in err[-1], err


def test_a_generation_config_that_is_not_there_is_an_error():
    from tandem.engine.engine import sampling_defaults

    with pytest.raises(ValueError, match="generation_config must be"):
        sampling_defaults("/models/x", "/nonexistent")  # a typo used to fall back to the model's own


def test_tandem_serve_subprocess(tiny_model_dirs, tmp_path):
    port = free_port()
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(f"port: {port}\nhost: 127.0.0.1\nmax-model-len: 128\nserved-model-name: [tiny-served]\n"
                   "uvicorn-log-level: warning\n")
    tandem = Path(sys.executable).with_name("tandem")
    proc = subprocess.Popen([str(tandem), "serve", tiny_model_dirs["qwen2"], "--config", str(cfg),
                             "--api-key", "k1", "--dtype", "float32", "--enable-request-id-headers"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "TANDEM_NO_PROGRESS": "1"})
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "tandem serve did not come up"
            time.sleep(0.5)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k1", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["tiny-served"]
        assert client.models.list().data[0].model_extra["max_model_len"] == 128
        r = client.chat.completions.with_raw_response.create(
            model="tiny-served", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
            extra_body={"ignore_eos": True})
        assert r.headers["x-request-id"] and r.parse().usage.completion_tokens == 3
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k2", max_retries=0).models.list()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    assert proc.returncode == 0, out
    assert "serving tiny-served" in out and "request" in out  # startup line and a request log line


def test_prefill_workers_find_the_kv_store_the_operator_names(monkeypatch):
    """The operator sets TANDEM_KVSTORE_ADDRESS in a model's pods when its kvStore is enabled."""
    monkeypatch.delenv("TANDEM_KVSTORE_ADDRESS", raising=False)
    assert parse_args(["prefill"])[1].kv_store is None
    monkeypatch.setenv("TANDEM_KVSTORE_ADDRESS", "m1-kvstore.models.svc.cluster.local:50060")
    assert parse_args(["prefill"])[1].kv_store == "m1-kvstore.models.svc.cluster.local:50060"
    assert parse_args(["prefill", "--kv-store", "127.0.0.1:50060"])[1].kv_store == "127.0.0.1:50060"
