"""`specdec bench` and `specdec corpus` on the real model with tiny budgets, and the report's arithmetic."""

import json
import math
import random

import pytest
import torch

import specdec
from specdec import bench
from drafters import make_drafter
from specdec.cli import main


def test_summary_follows_spec_bench():
    rows = [  # two questions; "ngram" is 2x then 4x as fast as "none"
        dict(question_id=1, category="a", method="none", tokens=10, seconds=1.0, steps=10, outputs=[[1]]),
        dict(question_id=1, category="a", method="ngram", tokens=10, seconds=0.5, steps=4, outputs=[[1]]),
        dict(question_id=2, category="b", method="none", tokens=30, seconds=1.0, steps=30, outputs=[[2]]),
        dict(question_id=2, category="b", method="ngram", tokens=30, seconds=0.25, steps=6, outputs=[[3]]),
    ]
    r = bench.summarize(rows, ["none", "ngram"], 0.0, {})
    # speedup = mean tokens/s of the method over that of "none": (20 + 120) / 2 / ((10 + 30) / 2)
    assert r["table"]["ngram"]["overall"]["speedup"] == pytest.approx(140 / 40)
    assert r["table"]["ngram"]["overall"]["mean_accepted_tokens"] == pytest.approx(40 / 10)
    assert r["table"]["ngram"]["a"]["speedup"] == pytest.approx(2.0)
    assert r["greedy_mismatches"] == {"ngram": [2]}


def test_questions_sampling_and_errors(tmp_path):
    qs = bench.load_questions()
    assert len({q["category"] for q in qs}) == len(qs) == 13
    assert bench.load_questions(per_category=1) == bench.load_questions(per_category=1)
    (tmp_path / "q.jsonl").write_text(json.dumps({"question_id": 1, "turns": ["hi"]}) + "\n")
    with pytest.raises(ValueError, match="category"):
        bench.load_questions(tmp_path / "q.jsonl")
    with pytest.raises(FileNotFoundError):
        bench.load_questions(tmp_path / "none.jsonl")


@pytest.mark.slow
def test_bench_runs_and_checks_greedy_outputs(tmp_path, capsys):
    out = tmp_path / "report.json"
    main(["bench", "--limit", "2", "--max-new-tokens", "12", "--drafters", "ngram", "--device", "cpu",
          "--out", str(out)])
    text = capsys.readouterr().out
    assert "greedy check: ngram: identical to 'none' on every question" in text
    report = json.loads(out.read_text())
    assert set(report["table"]) == {"none", "ngram"}
    assert report["greedy_mismatches"] == {"ngram": []}
    assert report["table"]["none"]["overall"]["speedup"] == pytest.approx(1.0)
    assert 0 <= report["table"]["ngram"]["overall"]["draft_fraction"] < 1
    assert "drafting share of step time" in text and "decode-only speedup" in text
    assert report["table"]["ngram"]["overall"]["decode_speedup"] > 0
    assert out.with_suffix(".png").stat().st_size > 1000


@pytest.mark.slow
def test_corpus_command_excludes_the_measured_sample(tmp_path):
    from drafters.corpus import Corpus

    questions = tmp_path / "q.jsonl"
    topics = ["cats", "rivers", "bread"]
    questions.write_text("".join(json.dumps({"question_id": i, "category": "a", "turns": [f"One line on {t}."]}) + "\n"
                                 for i, t in enumerate(topics)))
    out = tmp_path / "c.npz"
    main(["corpus", "--questions", str(questions), "--exclude-sample", "1", "--max-new-tokens", "8",
          "--out", str(out), "--device", "cpu"])
    assert len(Corpus.load(out)) == 2  # the one question bench would measure is left out
    measured = {str(q["question_id"]) for q in bench.load_questions(questions, per_category=1)}
    assert set(Corpus.load(out).sources) == {"0", "1", "2"} - measured
    with pytest.raises(SystemExit):  # measuring every question: the corpus holds answers to two of them
        main(["bench", "--questions", str(questions), "--drafters", "sam", "--corpus", str(out), "--device", "cpu"])
    with pytest.raises(SystemExit):
        main(["corpus", "--exclude-sample", "1", "--out", str(out), "--device", "cpu"])


def test_bench_refuses_a_corpus_built_from_measured_questions(tmp_path, capsys):
    from drafters.corpus import Corpus

    questions = [dict(question_id=i, category="a", turns=["hi"]) for i in (81, 82)]
    Corpus([[1, 2]], vocab_size=10, sources=[82, 90]).save(tmp_path / "overlap.npz")
    with pytest.raises(ValueError, match="built from 1 of the measured questions .ids 82"):
        bench.check_corpus(tmp_path / "overlap.npz", questions)
    Corpus([[1, 2]], vocab_size=10, sources=[90, 91]).save(tmp_path / "apart.npz")
    bench.check_corpus(tmp_path / "apart.npz", questions)
    Corpus([[1, 2]], vocab_size=10).save(tmp_path / "unknown.npz")
    bench.check_corpus(tmp_path / "unknown.npz", questions)
    assert "does not record the prompts" in capsys.readouterr().err


def test_warm_up_prefers_questions_whose_answers_are_not_in_the_corpus(capsys):
    qs = [dict(question_id=i, category="abc"[i % 3], turns=["hi"]) for i in range(9)]
    measured = qs[:3]
    warm = bench.warmup_questions(qs, measured, 4, corpus_sources=[3, 4, 5])
    assert [q["question_id"] for q in warm[:3]] == [6, 7, 8] and warm[3]["question_id"] in (3, 4, 5)
    assert "only 3 warm-up questions lie outside the corpus; 1 more" in capsys.readouterr().err
    assert [q["question_id"] for q in bench.warmup_questions(qs, measured, 2, corpus_sources=[3, 4, 5])] == [6, 7]
    assert capsys.readouterr().err == ""
    assert [q["question_id"] for q in bench.warmup_questions(qs, measured, 9)] == [3, 4, 5, 6, 7, 8]


def test_cli_errors(capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "hello", "--model", "/nonexistent.gguf"])
    assert e.value.code == 2 and "no model at" in capsys.readouterr().err


def test_cli_drafter_options():
    from argparse import Namespace

    from specdec.cli import _drafter_options

    args = Namespace(corpus="c.npz", drafter_option=["recycle.shape=best_first", "top_k=4", "sam.bias=2.5",
                                                     "recycle.chain_streak=none", "ngram.fast=TRUE"])
    assert _drafter_options(args, ["ngram", "recycle", "sam"]) == {
        "ngram": {"top_k": 4, "fast": True},
        "recycle": {"corpus": "c.npz", "shape": "best_first", "top_k": 4, "chain_streak": None},
        "sam": {"corpus": "c.npz", "top_k": 4, "bias": 2.5}}
    for bad, match in [("shape", "KEY=VALUE"), ("=3", "KEY=VALUE"), ("suffix.x=1", "not among"),
                       ("recycle.2x=1", "KEY=VALUE")]:
        with pytest.raises(ValueError, match=match):
            _drafter_options(Namespace(corpus=None, drafter_option=[bad]), ["ngram", "recycle"])
    with pytest.raises(ValueError, match="takes no drafter options"):
        _drafter_options(Namespace(corpus=None, drafter_option=["top_k=2"]), ["none"])


def test_unknown_drafter_option_names_the_known_ones():
    with pytest.raises(TypeError, match=r"no option 'shapes': its options are \[.*'shape'"):
        make_drafter("recycle", shapes="best_first")


@pytest.mark.slow
def test_batch_size_sweep_writes_table_json_and_plot(tmp_path, capsys):
    out = tmp_path / "sweep.json"
    main(["bench", "--batch-sizes", "1,2", "--draft-lengths", "3", "--limit", "2", "--max-new-tokens", "6",
          "--drafters", "ngram", "--device", "cpu", "--warmup", "1", "--repeats", "2", "--out", str(out)])
    text = capsys.readouterr().out
    assert "auto vs best fixed length: batch 2 ngram" in text
    rows = json.loads(out.read_text())["sweep"]
    assert {(r["batch"], r["drafter"], r["num_draft_tokens"]) for r in rows} == {
        (b, d, k) for b in (1, 2) for d, k in [("none", 0), ("ngram", 3), ("ngram", "auto")]}
    assert all(r["speedup"] == 1.0 and r["speedup_range"] == [1.0, 1.0] for r in rows if r["drafter"] == "none")
    # the overall ratio is a ratio of sums over both rounds: it lies within the rounds' own ratios
    assert all(r["rounds"] == 2 and r["speedup_range"][0] - 1e-9 <= r["speedup"] <= r["speedup_range"][1] + 1e-9
               for r in rows)
    # paired per batch: 2 rounds x 2 batches of 1 at batch 1 (--limit 2), 2 x 1 at batch 2
    assert all(r["pairs"] == 4 // r["batch"] and r["paired_ci95"][0] <= r["paired_speedup"] <= r["paired_ci95"][1]
               for r in rows)
    assert all(r["paired_speedup"] == 1.0 for r in rows if r["drafter"] == "none")
    assert out.with_suffix(".png").stat().st_size > 1000
    assert json.loads(out.read_text())["settings"]["warmup_questions"] == 1


class _FakeModel:
    """Enough of a Model for `bench.sweep`'s bookkeeping (its decoding is `_fake_generate`)."""

    name, device, dtype = "fake", torch.device("cpu"), torch.float32

    class tokenizer:
        @staticmethod
        def apply_chat_template(messages, **kwargs):
            return [1, 2, 3]


def _fake_generate(model, prompts, max_new_tokens, drafter="none", num_draft_tokens=0):
    batch = 1 if isinstance(prompts, str) else len(prompts)
    stats = dict(tokens=max_new_tokens * batch, seconds=1.0, prefill_seconds=0.5)
    return specdec.GenerationResult(texts=[""] * batch, token_ids=[[0] * max_new_tokens] * batch, stats=stats)


def test_sweep_writes_each_batch_size_as_it_goes(monkeypatch):
    """`on_batch` sees the rows of every batch size finished so far (a long sweep is not all lost)."""
    seen = []
    monkeypatch.setattr(bench, "generate", _fake_generate)
    report = bench.sweep(_FakeModel(), bench.load_questions(limit=2), ["ngram"], [1, 2], draft_lengths=(2,),
                         max_new_tokens=4, on_batch=lambda r: seen.append(sorted({x["batch"] for x in r["sweep"]})),
                         progress=False)
    assert seen == [[1], [1, 2]] and len(report["sweep"]) == 6
    with pytest.raises(ValueError, match="repeats"):
        bench.sweep(_FakeModel(), bench.load_questions(limit=2), ["ngram"], [1], repeats=0)


def test_sweep_turns_the_order_so_a_position_penalty_falls_on_every_configuration_alike(monkeypatch):
    """A decode that runs second in its batch takes 5% longer, third 10%: identical configurations
    must still come out at 1.00x of AR (on this project's 2-core CPU, three AR decodes of each batch
    in a fixed order measured 1, 0.96 and 0.95x). Each configuration decodes first equally often."""
    calls = []

    def slower_later(model, prompts, max_new_tokens, drafter="none", num_draft_tokens=0):
        r = _fake_generate(model, prompts, max_new_tokens, drafter, num_draft_tokens)
        if not isinstance(prompts, str):  # not the untimed warm-up
            position = len(calls) % 3
            calls.append(num_draft_tokens)
            r.stats["seconds"] = r.stats["prefill_seconds"] + 0.5 * (1 + 0.05 * position)
        return r

    monkeypatch.setattr(bench, "generate", slower_later)
    report = bench.sweep(_FakeModel(), bench.load_questions(limit=6), ["ngram"], [1], draft_lengths=(2,),
                         max_new_tokens=4, requests=6, progress=False)
    assert len(calls) == 18 and sorted(map(str, calls[::3])) == ["0", "0", "2", "2", "auto", "auto"]
    for row in report["sweep"]:
        assert row["paired_speedup"] == pytest.approx(1.0) and row["speedup"] == pytest.approx(1.0)


def test_sweep_refuses_to_warm_up_on_measured_questions():
    questions = bench.load_questions(limit=3)
    with pytest.raises(ValueError, match="warm-up"):
        bench.sweep(None, questions, ["ngram"], [1], warmup=questions[2:])


def test_round_robin_takes_every_category_in_turn():
    qs = [dict(question_id=i, category=c, turns=["x"]) for i, c in enumerate("aaabbc")]
    assert [q["question_id"] for q in bench.round_robin(qs)] == [0, 3, 5, 1, 4, 2]


def test_t_quantile_matches_known_values():
    known = {1: 12.706, 4: 2.776, 9: 2.262, 10: 2.228, 20: 2.086, 60: 2.000, 1000: 1.962}
    assert all(abs(bench.t_quantile_975(df) - t) < 3e-3 for df, t in known.items())
    with pytest.raises(ValueError, match="degrees of freedom"):
        bench.t_quantile_975(0)


def test_paired_ratio_interval_tells_a_real_slowdown_from_noise():
    rng = random.Random(0)
    noise = [rng.gauss(0.0, 0.03) for _ in range(12)]  # 3% per-batch noise
    same = bench.paired_ratio(noise)  # a configuration as fast as AR
    slower = bench.paired_ratio([x + math.log(0.9) for x in noise])  # 10% slower on every batch
    assert same["pairs"] == 12 and same["paired_ci95"][0] < 1.0 < same["paired_ci95"][1]
    assert slower["paired_ci95"][1] < 1.0  # the interval excludes AR: the slowdown is detected
    assert slower["paired_speedup"] == pytest.approx(0.9 * same["paired_speedup"])
    one = bench.paired_ratio([math.log(1.2)])
    assert one["paired_ci95"] is None and one["paired_speedup"] == pytest.approx(1.2)
