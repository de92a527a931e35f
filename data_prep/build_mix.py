"""Build the paper's instruction mix: Orca, code-alpaca, GSM8K train and ARC train, deduplicated,
filtered against the evaluation test sets, shuffled by seed.

    python -m data_prep.build_mix --output_dir data/mix [--data_dir ../shared/data] [--seed 42]

Writes OUT/mix.jsonl (ShareGPT conversations) and OUT/manifest.json: per source the rows read,
malformed (with where), converted, kept, and dropped by reason; the sha256 of every input file
(or the hub dataset and its fingerprint) and of the output; the seed and tool versions. Both files
are replaced atomically. Sources come from --data_dir (default: ../shared/data when it exists) in
their original formats, or from the dataset hub (`--data_dir hub`); --tulu_path reads the Orca and
code-alpaca parts from a local copy of the Tülu v2 mixture instead.

Deduplication keeps the first occurrence, in source order (orca, code_alpaca, gsm8k, arc), of
each conversation, exactly and after normalising its text (case, punctuation, white space). The
contamination filter drops a training conversation whose question, normalised, equals a GSM8K,
ARC or MMLU test question.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import random
import sys
import time
from collections import Counter
from pathlib import Path

from data_prep import arc, code_alpaca, gsm8k, orca
from data_prep.benchmarks import test_questions
from data_prep.common import SourceError, Tally, default_data_dir, normalize, sha256_file, with_replies, write_jsonl

SOURCES = {"orca": orca, "code_alpaca": code_alpaca, "gsm8k": gsm8k, "arc": arc}
PAPER_TOTAL = 60542
STAND_IN_SHARE = 0.9  # a source with fewer rows than this share of the paper's is reported as a stand-in


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", required=True, help="where mix.jsonl and manifest.json go")
    parser.add_argument(
        "--data_dir", default=None, help="local mirror (default: ../shared/data if present); 'hub' for the hub"
    )
    parser.add_argument(
        "--tulu_path", default=None, help="local Tülu v2 mixture JSONL for the Orca and code-alpaca parts"
    )
    parser.add_argument("--seed", type=int, default=42, help="shuffle seed")
    parser.add_argument(
        "--max_bad_fraction", type=float, default=0.01, help="fail when a source has more malformed rows"
    )
    parser.add_argument(
        "--expect_paper_counts",
        action="store_true",
        help="print every source's count against the paper's, before and after the filter; fail unless the "
        "converted sources have the paper's counts",
    )
    return parser.parse_args(argv)


def read_sources(data_dir: Path | None, tulu_path: Path | None) -> tuple[dict, dict[str, Tally]]:
    examples, tallies = {}, {}
    for name, module in SOURCES.items():
        tallies[name] = Tally()
        extra = {"tulu_path": tulu_path} if tulu_path is not None and name in ("orca", "code_alpaca") else {}
        examples[name] = list(with_replies(module.examples(data_dir, tallies[name], **extra), tallies[name]))
    return examples, tallies


def check_malformed(tallies: dict[str, Tally], max_bad: float) -> None:
    for name, tally in tallies.items():
        bad = len(tally.malformed)
        if tally.read and bad / tally.read > max_bad:
            raise SourceError(f"{name}: {bad} of {tally.read} rows malformed, over --max_bad_fraction {max_bad}")


def check_paper_counts(examples: dict, mix: list[dict]) -> None:
    """Print each source's count against the paper's before and after the filter; fail on a mismatch before it.

    The paper's counts are of the converted sources; the duplicate and contamination filter is ours,
    so what it drops is reported, not held against the sources.
    """
    kept = Counter(r["source"] for r in mix)
    print(f"{'source':12s} {'paper':>7s} {'before filter':>14s} {'after filter':>13s}")
    for name, source_examples in examples.items():
        print(f"{name:12s} {SOURCES[name].PAPER_COUNT:7d} {len(source_examples):14d} {kept[name]:13d}")
    print(f"{'total':12s} {PAPER_TOTAL:7d} {sum(map(len, examples.values())):14d} {len(mix):13d}")
    for name, source_examples in examples.items():
        paper = SOURCES[name].PAPER_COUNT
        if len(source_examples) != paper:
            raise SourceError(f"{name}: {len(source_examples)} conversations before the filter, the paper has {paper}")


NGRAM = 13  # lm-evaluation-harness's decontamination n-gram
MIN_WORDS = 8  # a shorter test question ("what is the capital of france") says too little to match on


def ngram_index(tests: dict[str, set[str]]) -> dict[tuple[str, ...], str]:
    """Every 13-word window of every (normalised) test question -> its benchmark; a question of 8 to 12
    words is one window of its own length, so that it is found whole inside a longer prompt."""
    index = {}
    for bench, questions in tests.items():
        for question in questions:
            words = question.split()
            if MIN_WORDS <= len(words) < NGRAM:
                index.setdefault(tuple(words), bench)
            for i in range(len(words) - NGRAM + 1):
                index.setdefault(tuple(words[i : i + NGRAM]), bench)
    return index


def overlap(prompt: str, index: dict[tuple[str, ...], str], sizes: list[int]) -> tuple[str, str] | None:
    """(benchmark, the shared words) when a training prompt holds a window of the index (of these sizes)."""
    words = prompt.split()
    for size in sizes:
        for i in range(len(words) - size + 1):
            window = tuple(words[i : i + size])
            if window in index:
                return index[window], " ".join(window)
    return None


def filter_examples(
    examples: dict, tallies: dict[str, Tally], tests: dict[str, set[str]], contaminated: list[dict] | None = None
) -> list[dict]:
    """Drop duplicates (exact, then normalised) and test-set questions; keep source order.

    A conversation is contaminated when its question equals a test question (normalised), or when
    any of its prompts shares a 13-word window with one: a test question quoted inside a longer
    prompt, as lm-evaluation-harness's decontamination finds it. ``contaminated`` collects what was
    dropped for it and why (id, source, benchmark, the shared words).
    """
    index = ngram_index(tests)
    sizes = sorted({len(key) for key in index})  # 8 .. 13
    kept, seen_exact, seen_norm = [], set(), set()
    for name, source_examples in examples.items():
        for ex in source_examples:
            turns = json.dumps(ex.record["conversations"], ensure_ascii=False, sort_keys=True)
            norm = normalize(" ".join(t["value"] for t in ex.record["conversations"]))
            question = normalize(ex.question)
            hit = next(((bench, "the whole question") for bench, qs in tests.items() if question in qs), None)
            prompts = (normalize(t["value"]) for t in ex.record["conversations"] if t["from"] != "gpt")
            hit = hit or next(filter(None, (overlap(prompt, index, sizes) for prompt in prompts)), None)
            if turns in seen_exact:
                tallies[name].dropped["duplicate (exact)"] += 1
            elif norm in seen_norm:
                tallies[name].dropped["duplicate (normalised)"] += 1
            elif hit:
                tallies[name].dropped[f"contaminated ({hit[0]} test)"] += 1
                if contaminated is not None:
                    contaminated.append({"id": ex.record["id"], "source": name, "benchmark": hit[0], "shared": hit[1]})
            else:
                kept.append({**ex.record, "source": name})
            seen_exact.add(turns)
            seen_norm.add(norm)
    return kept


def versions() -> dict:
    found = {"python": platform.python_version()}
    for package in ("datasets", "fastchat_plora"):
        try:
            found[package] = __import__(package).__version__
        except ImportError:
            pass
    return found


def build(args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    data_dir = None if args.data_dir == "hub" else Path(args.data_dir) if args.data_dir else default_data_dir()
    tulu_path = Path(args.tulu_path) if args.tulu_path else None
    examples, tallies = read_sources(data_dir, tulu_path)
    check_malformed(tallies, args.max_bad_fraction)
    contaminated = []
    mix = filter_examples(examples, tallies, test_questions(data_dir), contaminated)
    if args.expect_paper_counts:
        check_paper_counts(examples, mix)  # before anything is written
    if not mix:
        raise SourceError("the mix is empty: every conversation was dropped")
    random.Random(args.seed).shuffle(mix)

    out = Path(args.output_dir)
    write_jsonl(mix, out / "mix.jsonl")
    kept = Counter(r["source"] for r in mix)
    manifest = {
        "output": {"path": "mix.jsonl", "conversations": len(mix), "sha256": sha256_file(out / "mix.jsonl")},
        "seed": args.seed,
        "data_dir": str(data_dir) if data_dir else "hub",
        "paper_total": PAPER_TOTAL,
        "sources": {
            name: {
                "read": tally.read,
                "malformed": len(tally.malformed),
                "malformed_where": tally.malformed[:100],
                "converted": len(examples[name]),
                "kept": kept[name],
                "dropped": dict(tally.dropped),
                "paper_count": SOURCES[name].PAPER_COUNT,
                "stand_in": len(examples[name]) < STAND_IN_SHARE * SOURCES[name].PAPER_COUNT,
                "inputs": tally.inputs,
            }
            for name, tally in tallies.items()
        },
        "contaminated": contaminated,  # what the contamination filter dropped, and the words it matched on
        "versions": versions(),
        "seconds": round(time.perf_counter() - start, 2),
    }
    manifest_tmp = out / ".manifest.json.tmp"
    manifest_tmp.write_text(json.dumps(manifest, indent=2, ensure_ascii=False))
    manifest_tmp.replace(out / "manifest.json")
    return manifest


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    args = parse(argv)
    try:
        manifest = build(args)
    except SourceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{'source':12s} {'read':>7s} {'bad':>5s} {'kept':>7s} {'paper':>7s}  dropped")
    for name, s in manifest["sources"].items():
        note = "  (stand-in)" if s["stand_in"] else ""
        print(
            f"{name:12s} {s['read']:7d} {s['malformed']:5d} {s['kept']:7d} {s['paper_count']:7d}  {s['dropped']}{note}"
        )
    print(
        f"wrote {manifest['output']['conversations']} conversations to {args.output_dir}/mix.jsonl "
        f"in {manifest['seconds']} s (paper: {PAPER_TOTAL})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
