"""The LLM client against a fake OpenAI server on 127.0.0.1: retries, named failures, cache and resume.

Every claim is checked by counting the requests the server received, not by trusting the client's own counts.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from embtune.config import ConfigError, build
from embtune.llm.client import AnswerCache, ChatRequest, backoff_delay, cache_key, generate_all, resolve_endpoint
from embtune.llm.config import LLMConfig
from tests.fake_openai_server import FakeOpenAIServer

ROOT = Path(__file__).resolve().parents[1]


def make_requests(n: int, prefix: str = "doc") -> list[ChatRequest]:
    return [ChatRequest(id=f"{prefix}{i}", messages=[{"role": "user", "content": f"passage {prefix}{i}"}],
                        document_hash=f"hash-{prefix}{i}") for i in range(n)]


def fast_cfg(server: FakeOpenAIServer, **overrides) -> LLMConfig:
    values = dict(endpoint=server.base_url, model="fake", max_attempts=3, backoff_base_s=0.01, backoff_max_s=0.02,
                  timeout_s=10.0, concurrency=4, progress=False)
    values.update(overrides)
    return LLMConfig(**values)


@pytest.mark.parametrize(
    "fault, reason",
    [
        ("429", "429 Too Many Requests"),
        ("500", "500 Internal Server Error"),
        ("malformed", "malformed response"),
        ("empty_choices", "empty choices"),
        ("hang", "request timed out (1s)"),
    ],
)
def test_each_fault_is_retried_then_reported_by_name(fault, reason, tmp_path):
    with FakeOpenAIServer(fault=fault, hang_s=3) as server:
        # Only the hang case needs a short timeout; elsewhere a generous one keeps a loaded machine from turning
        # a 429 into a client-side timeout before the request is even sent.
        timeout = 1.0 if fault == "hang" else 10.0
        run = generate_all(make_requests(3), fast_cfg(server, timeout_s=timeout), tmp_path / "cache.jsonl")
    assert server.requests == 3 * 3  # every item tried max_attempts times
    assert run.stats.failed == 3 and run.stats.done == 0 and run.stats.http_requests == 9
    for result in run.results:
        assert result.text is None
        assert result.error.startswith(f"LLMRequestFailed: {reason}")
        assert result.error.endswith("after 3 attempts")
    assert sum(run.stats.errors.values()) == 3
    assert AnswerCache(tmp_path / "cache.jsonl").answers == {}  # failures are not cached


@pytest.mark.parametrize("fault", ["429", "500", "malformed", "empty_choices", "hang"])
def test_transient_fault_is_retried_until_it_succeeds(fault, tmp_path):
    with FakeOpenAIServer(fault=fault, fault_times=2, hang_s=3) as server:
        run = generate_all(make_requests(4), fast_cfg(server, timeout_s=1.0 if fault == "hang" else 10.0),
                           tmp_path / "cache.jsonl")
    assert run.stats.failed == 0 and run.stats.done == 4
    assert server.requests == 4 + 2  # two faulted attempts were retried
    assert all(result.text and result.error is None for result in run.results)


def test_non_retryable_status_fails_at_once(tmp_path):
    with FakeOpenAIServer() as server:
        cfg = fast_cfg(server, endpoint=server.base_url.replace("/v1", "/nope"))  # 404
        run = generate_all(make_requests(2), cfg, tmp_path / "cache.jsonl")
    assert server.requests == 0
    assert [r.error for r in run.results] == ["LLMRequestFailed: 404 Not Found: not found after 1 attempt"] * 2


def test_connection_error_is_retried_and_named(tmp_path):
    server = FakeOpenAIServer()
    url = server.base_url
    server.stop()  # nothing listens on that port any more
    run = generate_all(make_requests(1), LLMConfig(endpoint=url, model="m", max_attempts=2, backoff_base_s=0.01,
                                                   backoff_max_s=0.01, progress=False), tmp_path / "c.jsonl")
    assert run.results[0].error.startswith("LLMRequestFailed: connection error")
    assert run.results[0].error.endswith("after 2 attempts")


def test_concurrency_is_bounded(tmp_path):
    with FakeOpenAIServer(latency_s=0.1) as server:
        generate_all(make_requests(12), fast_cfg(server, concurrency=4), tmp_path / "cache.jsonl")
    assert server.max_in_flight == 4  # 12 requests of 0.1 s: the bound is reached and never exceeded


def test_usage_tokens_and_cost_are_summed(tmp_path):
    with FakeOpenAIServer() as server:
        cfg = fast_cfg(server, price_input_per_1m=2.0, price_output_per_1m=10.0)
        run = generate_all(make_requests(5), cfg, tmp_path / "cache.jsonl")
    # The fake server counts words: "passage docN" = 2 prompt tokens; 3 lines of 6 words = 18 completion tokens.
    assert run.stats.prompt_tokens == 5 * 2 and run.stats.completion_tokens == 5 * 18
    assert run.stats.cost_usd == pytest.approx(10 / 1e6 * 2.0 + 90 / 1e6 * 10.0)


def test_rerun_requests_nothing_already_answered(tmp_path):
    cache = tmp_path / "cache.jsonl"
    with FakeOpenAIServer() as server:
        first = generate_all(make_requests(6), fast_cfg(server), cache)
        second = generate_all(make_requests(6), fast_cfg(server), cache)
        assert server.requests == 6
    assert second.stats.cached == 6 and second.stats.done == 0
    assert [r.text for r in second.results] == [r.text for r in first.results]
    assert second.stats.prompt_tokens == 0  # tokens count what this run spent


def test_cache_key_changes_with_model_sampling_and_document():
    messages = [{"role": "user", "content": "x"}]
    base = cache_key("m", messages, {"temperature": 0.7}, "h")
    assert base == cache_key("m", [dict(messages[0])], {"temperature": 0.7}, "h")
    assert base != cache_key("m2", messages, {"temperature": 0.7}, "h")
    assert base != cache_key("m", messages, {"temperature": 0.2}, "h")
    assert base != cache_key("m", messages, {"temperature": 0.7}, "h2")
    assert base != cache_key("m", [{"role": "user", "content": "y"}], {"temperature": 0.7}, "h")


def test_failed_run_rerun_after_recovery_answers_every_document_exactly_once(tmp_path):
    cache = tmp_path / "cache.jsonl"
    requests = make_requests(10)
    with FakeOpenAIServer(fault=None) as server:
        # The server answers the first 4 requests, then fails everything (sequential client: deterministic).
        server.set_fault(None)
        answered_first = generate_all(requests[:4], fast_cfg(server, concurrency=1), cache)
        server.set_fault("500")
        failed = generate_all(requests, fast_cfg(server, concurrency=1), cache)
        assert answered_first.stats.done == 4
        assert failed.stats.cached == 4 and failed.stats.failed == 6
        assert all(r.error and "500 Internal Server Error after 3 attempts" in r.error for r in failed.results[4:])
        server.set_fault(None)  # the server recovers
        final = generate_all(requests, fast_cfg(server, concurrency=1), cache)
    assert final.stats.failed == 0 and final.stats.cached == 4 and final.stats.done == 6
    assert all(r.text for r in final.results)
    # Every document was answered by the server exactly once over the three runs.
    assert sorted(server.answered.values()) == [1] * 10
    assert set(server.answered) == {r.messages[-1]["content"] for r in requests}


def test_torn_last_line_is_ignored_and_repaired(tmp_path):
    cache_path = tmp_path / "cache.jsonl"
    with FakeOpenAIServer() as server:
        generate_all(make_requests(3), fast_cfg(server), cache_path)
        with open(cache_path, "ab") as handle:  # what kill -9 in the middle of a write leaves
            handle.write(b'{"key": "abc", "text": "half an ans')
        rerun = generate_all(make_requests(4), fast_cfg(server), cache_path)
        assert server.requests == 4  # 3, then only the new one
    assert rerun.stats.cached == 3 and rerun.stats.done == 1
    lines = cache_path.read_bytes().splitlines()
    assert len(lines) == 4 and all(json.loads(line)["key"] for line in lines)


def test_corrupt_middle_line_names_file_and_line(tmp_path):
    cache_path = tmp_path / "cache.jsonl"
    cache_path.write_text('{"key": "a", "text": "x"}\nnot json\n{"key": "b", "text": "y"}\n')
    with pytest.raises(ValueError, match=r"cache.jsonl:2: not a cache record"):
        AnswerCache(cache_path)


def test_one_run_at_a_time_per_cache_file(tmp_path):
    with AnswerCache(tmp_path / "cache.jsonl"):
        with pytest.raises(RuntimeError, match="in use by another run"):
            AnswerCache(tmp_path / "cache.jsonl")


_CHILD = textwrap.dedent(
    """
    import sys
    from embtune.llm.client import ChatRequest, generate_all
    from embtune.llm.config import LLMConfig
    url, cache, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    requests = [ChatRequest(id=f"doc{i}", messages=[{"role": "user", "content": f"passage doc{i}"}],
                            document_hash=f"hash-doc{i}") for i in range(n)]
    run = generate_all(requests, LLMConfig(endpoint=url, model="fake", concurrency=2, progress=False), cache)
    print("FINISHED", run.stats.done, flush=True)
    """
)


@pytest.mark.slow
def test_kill_9_mid_run_then_rerun_loses_nothing_and_repeats_nothing(tmp_path):
    n = 60  # 30 waves of 0.1 s: the kill lands well before the child could finish
    cache_path = tmp_path / "cache.jsonl"
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with FakeOpenAIServer(latency_s=0.1) as server:
        child = subprocess.Popen([sys.executable, str(script), server.base_url, str(cache_path), str(n)], cwd=ROOT,
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if cache_path.exists() and cache_path.read_bytes().count(b"\n") >= 10:
                break
            assert child.poll() is None, child.stdout.read().decode()
            time.sleep(0.01)
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        output = child.stdout.read().decode()
        assert child.returncode == -signal.SIGKILL and "FINISHED" not in output, output

        saved = AnswerCache(cache_path)
        saved_prompts = {f"passage {record['id']}" for record in saved.answers.values()}
        saved.close()
        assert 10 <= len(saved_prompts) < n
        received_before_rerun = server.received.copy()

        rerun = generate_all(make_requests(n), fast_cfg(server, concurrency=4), cache_path)
        received_by_rerun = server.received - received_before_rerun
    assert rerun.stats.failed == 0 and rerun.stats.cached == len(saved_prompts)
    assert all(result.text for result in rerun.results)
    # Nothing saved before the kill was asked again; everything else was asked exactly once.
    all_prompts = {f"passage doc{i}" for i in range(n)}
    assert set(received_by_rerun) == all_prompts - saved_prompts
    assert set(received_by_rerun.values()) == {1}
    assert len(AnswerCache(cache_path).answers) == n


def test_missing_endpoint_names_the_settings_to_change():
    with pytest.raises(ValueError, match=r"llm.endpoint.*OPENAI_BASE_URL.*OPENAI_API_KEY"):
        resolve_endpoint(LLMConfig(model="m"), env={})
    with pytest.raises(ValueError, match=r"llm.model"):
        resolve_endpoint(LLMConfig(endpoint="http://127.0.0.1:1/v1"), env={})
    endpoint = resolve_endpoint(LLMConfig(), env={"OPENAI_BASE_URL": "http://h/v1", "OPENAI_MODEL": "m",
                                                  "OPENAI_API_KEY": "k"})
    assert (endpoint.base_url, endpoint.api_key, endpoint.model) == ("http://h/v1", "k", "m")


def test_backoff_grows_exponentially_with_jitter_and_a_ceiling():
    import random

    cfg = LLMConfig(backoff_base_s=1.0, backoff_max_s=5.0)
    rng = random.Random(0)
    delays = [[backoff_delay(attempt, cfg, rng=rng) for _ in range(50)] for attempt in (1, 2, 3, 4)]
    for attempt, values in zip((1, 2, 3), delays):
        ceiling = 2 ** (attempt - 1)
        assert all(ceiling / 2 <= v <= ceiling for v in values) and len(set(values)) > 1
    assert all(2.5 <= v <= 5.0 for v in delays[3])  # 8 s capped at 5 s
    assert backoff_delay(1, cfg, retry_after_s=3.0, rng=rng) >= 3.0


def test_llm_config_is_checked_by_the_recipe_builder():
    cfg = build(LLMConfig, {"concurrency": 8, "style": "claim",
                            "few_shot": [{"document": "A passage.", "queries": ["a claim"]}]})
    assert cfg.few_shot[0].queries == ["a claim"]
    with pytest.raises(ConfigError, match="llm.concurrency must be >= 1"):
        build(LLMConfig, {"concurrency": 0})
    with pytest.raises(ConfigError, match="unknown key 'temprature'"):
        build(LLMConfig, {"temprature": 0.5})
    with pytest.raises(ConfigError, match="key 'style' expects"):
        build(LLMConfig, {"style": "poem"})
    with pytest.raises(ConfigError, match=r"llm.user_template must contain \{document\}"):
        build(LLMConfig, {"user_template": "no placeholder"})
