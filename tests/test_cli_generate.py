"""`gka-jax generate` on the bundled demo model: one prompt, chat mode over stdin, bad input."""

import os
import subprocess
import sys

from conftest import REPO


def run(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "gka_jax.cli", "generate", *args], capture_output=True, text=True,
                          input=stdin, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=600)


def test_prompt_streams_and_reports_speed():
    result = run("--prompt", "What is GKA?", "--max-new-tokens", "8", "--seed", "1", "--num-iter", "10")
    assert result.returncode == 0, result.stderr
    assert "bundled demo model (random weights" in result.stderr
    assert "8 tokens, length" in result.stderr and "time to first token" in result.stderr
    assert "tokens/s" in result.stderr
    again = run("--prompt", "What is GKA?", "--max-new-tokens", "8", "--seed", "1", "--num-iter", "10")
    assert again.stdout == result.stdout  # same seed, same text


def test_chat_two_turns_and_errors():
    result = run("--chat", "--no-think", "--max-new-tokens", "4", "--temperature", "0", stdin="hello\nagain\n")
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("4 tokens") + result.stderr.count(", stop;") >= 2
    bad = run("--model", "/nonexistent/folder", "--prompt", "x")
    assert bad.returncode == 1 and "error" in bad.stderr and "Traceback" not in bad.stderr
    bad = run("--top-p", "0", "--prompt", "x")
    assert bad.returncode == 1 and "top_p" in bad.stderr
