"""`vsampler generate`: tokens streamed from the tiny decoder through the decode loop."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from vsampler.tools.cli.arguments import id_ranges, int_list
from vsampler.tools.cli.ui import (
    EXIT_OK,
    EXIT_USAGE,
    environment,
    ui_for_output,
)


def _logprobs_json(state: Any, args: argparse.Namespace, rows: list[list[int]], bucket: int) -> dict[str, Any]:
    """Per row, per generated token: its log-probability and the top entries as [id, log-probability]."""
    if args.logprobs is None:
        return {}
    import numpy as np

    token_lp, top_ids, top_lp = map(np.asarray, (state.token_logprobs, state.top_logprob_ids, state.top_logprobs))
    out = []
    for r, row in enumerate(rows):
        slots = range(bucket, bucket + len(row))
        out.append(
            [
                {
                    "token": row[i],
                    "logprob": float(token_lp[r, s]),
                    "top": [[int(t), float(v)] for t, v in zip(top_ids[r, s], top_lp[r, s], strict=True)],
                }
                for i, s in enumerate(slots)
            ]
        )
    return {"logprobs_mode": args.logprobs_mode, "logprobs": out}


def run(args: argparse.Namespace) -> int:
    import jax
    import numpy as np

    from vsampler import SamplingParams, pack_allowed, vInference, vInferenceConfig, vInferencePreCompileConfig
    from vsampler.tools.loop_benchmark import tiny_model

    for name in ("batch", "max_new_tokens", "chunks", "vocab"):
        if getattr(args, name) < 1:
            print(f"vsampler generate: error: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return EXIT_USAGE
    try:
        params = SamplingParams(
            max_tokens=args.max_new_tokens,
            min_tokens=args.min_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            min_p=args.min_p,
            repetition_penalty=args.repetition_penalty,
            prompt_ignore_length=args.prompt_ignore_length,
            presence_penalty=args.presence_penalty,
            frequency_penalty=args.frequency_penalty,
        )
        model = tiny_model(args.vocab, seed=args.model_seed)
        config = vInferenceConfig(
            max_new_tokens=args.max_new_tokens,
            streaming_chunks=args.chunks,
            eos_token_id=list(args.eos) if args.eos else None,
            pad_token_id=0,
            sampling_params=params,
        )
        engine = vInference(model, config, impl=args.impl)
        if args.prompt:
            width = max(len(p) for p in args.prompt)
            ids = np.zeros((len(args.prompt), width), np.int32)
            mask = np.zeros_like(ids)
            for r, p in enumerate(args.prompt):
                ids[r, : len(p)], mask[r, : len(p)] = p, 1
        else:
            ids = np.random.default_rng(args.seed).integers(1, args.vocab, (args.batch, 16), dtype=np.int32)
            mask = np.ones_like(ids)
        lengths = mask.sum(axis=1)
        bucket = 1 << int(lengths.max() - 1).bit_length()
        allowed = None
        if args.allowed_ids is not None:
            if max(hi for _, hi in args.allowed_ids) > args.vocab:
                raise ValueError(f"--allowed-ids names ids outside the vocabulary [0, {args.vocab})")
            allowed_rows = np.zeros((ids.shape[0], args.vocab), bool)
            for lo, hi in args.allowed_ids:
                allowed_rows[:, lo:hi] = True
            allowed = pack_allowed(allowed_rows)
        serving = {"logprobs": args.logprobs, "logprobs_mode": args.logprobs_mode}
        engine.precompile(
            vInferencePreCompileConfig(batch_size=ids.shape[0], prefill_length=bucket),
            allowed_tokens=allowed is not None,
            **serving,
        )
        stream = engine.generate(ids, mask, key=jax.random.key(args.seed), allowed_tokens=allowed, **serving)
        ui = ui_for_output()
        ui.header("vsampler generate", environment())
        ui.note(f"tiny decoder, vocabulary {args.vocab}; {ids.shape[0]} prompts, bucket {bucket}; {params}")
        shown = [0] * ids.shape[0]
        state = None
        for chunk, state in enumerate(stream):
            seq, length = np.asarray(state.sequences), np.asarray(state.current_length)
            for r in range(ids.shape[0]):
                first = bucket + shown[r]
                new = seq[r, first : length[r]].tolist()
                shown[r] = int(length[r]) - bucket
                if new and args.logprobs is not None:
                    lps = np.asarray(state.token_logprobs[r, first : length[r]])
                    new = " ".join(f"{t} ({lp:.3f})" for t, lp in zip(new, lps, strict=True))
                if new:
                    ui.note(f"{'prefill' if chunk == 0 else f'chunk {chunk}'} row {r}: {new}")
    except ValueError as err:
        print(f"vsampler generate: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    assert state is not None
    seq, length = np.asarray(state.sequences), np.asarray(state.current_length)
    rows = [seq[r, bucket : length[r]].tolist() for r in range(ids.shape[0])]
    tps = float(state.tokens_per_second)
    ui.note(
        f"{int(state.generated_tokens)} tokens generated; decode {tps:.0f} tokens/s over "
        f"{float(state._time_spent_computing) * 1e3:.1f} ms of decode calls"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "environment": environment(),
                    "prompts": [ids[r][mask[r] > 0].tolist() for r in range(ids.shape[0])],
                    "generated": rows,
                    "finished": np.asarray(state.is_sequence_finished)[: ids.shape[0]].tolist(),
                    "generated_tokens": int(state.generated_tokens),
                    "decode_tokens_per_second": tps,
                    **_logprobs_json(state, args, rows, bucket),
                },
                f,
                indent=2,
            )
    return EXIT_OK


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Adds `vsampler generate` and its arguments to the subparsers `sub`."""

    gen = sub.add_parser(
        "generate",
        help="stream tokens from the tiny NNX decoder through the chunked decode loop",
        description=(
            "Builds vsampler's tiny Llama-style decoder (random weights from --model-seed: it has no "
            "tokenizer, prompts and outputs are token ids), precompiles the loop for the prompts' bucket, "
            "and streams the generated ids chunk by chunk (one compiled call of --chunks steps each), then "
            "reports decode tokens per second. Sampling options are SamplingParams fields; bad values are "
            "reported with the allowed range (exit 2)."
        ),
    )
    gen.add_argument(
        "--prompt",
        type=int_list,
        action="append",
        default=None,
        help="a prompt as comma-separated token ids; repeat for a batch (default: --batch random prompts)",
    )
    gen.add_argument("--batch", type=int, default=4, help="random prompts when no --prompt is given (default 4)")
    gen.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate per row (default 32)")
    gen.add_argument("--chunks", type=int, default=8, help="decode steps per compiled call (default 8)")
    gen.add_argument("--vocab", type=int, default=32000, help="the tiny decoder's vocabulary size (default 32000)")
    gen.add_argument("--model-seed", type=int, default=0, help="seed of the decoder's random weights (default 0)")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed (row r draws from fold_in(key, r); default 0)")
    gen.add_argument("--eos", type=int_list, default=None, help="comma-separated EOS ids (default: none)")
    from vsampler.core.params import _RANGES

    sampling_flags = gen.add_argument_group("sampling", "SamplingParams fields, the same for every row")
    for flag, kind, default, text in (
        ("--temperature", float, 0.8, "softmax temperature"),
        ("--top-k", int, 50, "keep the tokens >= the k-th largest logit (ties kept)"),
        ("--top-p", float, 0.95, "keep the most probable tokens up to this share of the mass (the crossing one kept)"),
        ("--min-p", float, 0.0, "keep the tokens whose probability is >= min_p x the largest's"),
        ("--repetition-penalty", float, 1.0, "divides the history's positive logits, multiplies its negative ones"),
        ("--prompt-ignore-length", int, 0, "the repetition penalty leaves out each prompt's first n tokens"),
        ("--presence-penalty", float, 0.0, "subtracted once from each token generated so far"),
        ("--frequency-penalty", float, 0.0, "subtracted per occurrence of each token generated so far"),
        ("--min-tokens", int, 0, "the EOS ids are banned until a row has generated this many tokens"),
    ):
        allowed = _RANGES[flag[2:].replace("-", "_")][5]
        sampling_flags.add_argument(flag, type=kind, default=default, help=f"{text}: {allowed} (default {default})")
    gen.add_argument(
        "--impl",
        choices=("auto", "reference", "xla", "pallas"),
        default="auto",
        help="sampler implementation (default auto: pallas on TPU, xla elsewhere)",
    )
    gen.add_argument(
        "--logprobs",
        type=int,
        default=None,
        metavar="N",
        help="also report each token's log-probability and the N most likely tokens (0-64)",
    )
    gen.add_argument(
        "--logprobs-mode",
        choices=("raw", "processed"),
        default="raw",
        help="raw: after penalties, before temperature and filters (default); processed: what was sampled from",
    )
    gen.add_argument(
        "--allowed-ids",
        type=id_ranges,
        default=None,
        metavar="IDS",
        help="structured output: only these token ids (and ranges, e.g. 100-199,2) may be generated; "
        "applied as a packed allowed_tokens mask at every step (add the EOS ids to let rows end early)",
    )
    gen.add_argument("--json", metavar="PATH", help="also write the generated ids and timings as JSON to PATH")
    return gen
