"""`python -m hive`: the command line. Each command is a thin wrapper around one module."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def print_json(obj: dict) -> None:
    """`--json` contract: one JSON object, on the last line of stdout."""
    sys.stdout.flush()
    print(json.dumps(obj, default=str), flush=True)


# ---------------------------------------------------------------- toy
def cmd_toy_sample(args: argparse.Namespace) -> int:
    from hive.toy import write_dataset

    path = write_dataset(Path(args.out), n=args.n, seed=args.seed, noise=args.noise, size=args.size)
    if args.json:
        print_json({"metadata": str(path), "n": args.n})
    else:
        print(f"wrote {args.n} examples to {path}")
    return 0


# ---------------------------------------------------------------- training the zoo
def cmd_train_tokenizer(args: argparse.Namespace) -> int:
    from hive.tokenizer import write_tokenizer

    out = write_tokenizer(Path(args.out))
    print(f"wrote tokenizer to {out}")
    return 0


def cmd_train_vae(args: argparse.Namespace) -> int:
    from hive.train_vae import train_vae

    t = time.time()
    path = train_vae(Path(args.out), steps=args.steps, batch_size=args.batch_size,
                     init=Path(args.init) if args.init else None, decoder_only=args.decoder_only,
                     latent_channels=args.latent_channels)
    _report_training(args, path, t)
    return 0


def cmd_train_decoder(args: argparse.Namespace) -> int:
    from hive.train_decoder import finetune_decoder, sample_editor_latents, summary

    t = time.time()
    out = Path(args.out)
    sample_editor_latents(args.editor, out / "latents", args.edits, batch=args.sample_batch,
                          max_minutes=args.max_sample_minutes)
    path = finetune_decoder(args.editor, out / "latents", out, steps=args.steps, batch_size=args.batch_size,
                            lr=args.lr, object_boost=args.object_boost, recon_share=args.recon_share,
                            crop=args.crop or None, held_out=args.held_out, checkpoint_every=args.checkpoint_every,
                            max_minutes=args.max_minutes)
    if not args.json:
        print(summary(out / "metrics.json"))
    _report_training(args, path, t)
    return 0


def cmd_train_clip(args: argparse.Namespace) -> int:
    from hive.train_clip import train_clip

    t = time.time()
    path = train_clip(Path(args.out), Path(args.tokenizer), steps=args.steps, batch_size=args.batch_size,
                      lr=args.lr, checkpoint_every=args.checkpoint_every, twins=args.twins,
                      base=Path(args.base) if args.base else None, edits=args.edits, decay_steps=args.decay_steps)
    _report_training(args, path, t)
    return 0


def cmd_train_editor(args: argparse.Namespace) -> int:
    from hive.data import FolderTriplets, ToyTriplets, parse_kind_weights
    from hive.train_sft import SFTConfig, train_sft
    from hive.zoo import assemble_base, swap_text_encoder

    out = Path(args.out)
    base = args.base
    if base is not None and args.clip:  # the base's UNet on another CLIP's text tower
        if not (out / "base" / "model_index.json").exists():
            swap_text_encoder(base, Path(args.clip), out / "base")
        base = out / "base"
    elif base is None:
        if not (args.vae and args.clip):
            print("error: give --base PIPELINE, or --vae and --clip to start a fresh toy UNet", file=sys.stderr)
            return 2
        base = out / "base"
        if not (base / "model_index.json").exists():
            assemble_base(Path(args.vae), Path(args.clip), base)
    resolution = args.resolution
    try:
        kind_weights = parse_kind_weights(args.kind_weights or "")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.data:
        if kind_weights:
            print("error: --kind-weights shapes the toy stream; it does not apply to --data", file=sys.stderr)
            return 2
        data = FolderTriplets(Path(args.data), resolution, seed=args.seed)
    else:
        data = ToyTriplets(resolution, noise=args.toy_noise, seed=args.seed, kind_weights=kind_weights)
    config = SFTConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                       ema_decay=None if args.no_ema else args.ema_decay, mixed_precision=args.mixed_precision,
                       checkpoint_every=args.checkpoint_every, gradient_checkpointing=args.gradient_checkpointing,
                       change_weight=args.change_weight, high_noise_bias=args.high_noise_bias,
                       pixel_loss_weight=args.pixel_loss_weight, pixel_loss_min_signal=args.pixel_loss_min_signal,
                       max_minutes=args.max_minutes, decay_steps=args.decay_steps,
                       min_snr_gamma=args.min_snr_gamma if args.min_snr_gamma > 0 else None,
                       channels_last=args.channels_last, compile=args.compile, dataloader_workers=args.workers)
    t = time.time()
    path = train_sft(base, data, out, config)
    _report_training(args, path, t)
    return 0


def cmd_train_add_attention(args: argparse.Namespace) -> int:
    from hive.zoo import with_finest_attention

    path = with_finest_attention(args.base, Path(args.out), args.place, cross_only=args.cross_only)
    print(f"wrote {path}: {args.base} with attention at the UNet's finest level ({args.place}"
          f"{', cross-attention only' if args.cross_only else ''}); train it with `train editor --base {path}`")
    return 0


def cmd_train_export(args: argparse.Namespace) -> int:
    from hive.train_sft import export_checkpoint

    path = export_checkpoint(Path(args.run), Path(args.out), use_ema=not args.no_ema)
    print(f"wrote {path}")
    return 0


def cmd_train_ship(args: argparse.Namespace) -> int:
    from hive.zoo import MODELS_DIR, ship

    written = ship(Path(args.editor), Path(args.clip), Path(args.models) if args.models else MODELS_DIR,
                   vae_dir=Path(args.vae) if args.vae else None,
                   sampling={k: v for k, v in (("guidance", args.guidance), ("image_guidance", args.image_guidance),
                                               ("steps", args.steps), ("mask_threshold", args.mask_threshold))
                             if v is not None})
    for name, path in written.items():
        print(f"{name}: {path}")
    return 0


def _report_training(args: argparse.Namespace, path: Path, started: float) -> None:
    seconds = round(time.time() - started, 1)
    if getattr(args, "json", False):
        print_json({"model": str(path), "seconds": seconds})
    else:
        print(f"saved {path} ({seconds} s)")


# ---------------------------------------------------------------- edit
def cmd_edit(args: argparse.Namespace) -> int:
    from hive.editor import Editor, EditorInputError
    from hive.files import save_png_atomic, write_json_atomic

    out = Path(args.out)
    try:
        editor = Editor(args.model, mask_threshold=args.mask_threshold)
        if args.data:
            return _edit_dataset(editor, Path(args.data), out, args)
        if not (args.image and args.instruction is not None):
            print("error: give --image and --instruction, or --data DIR", file=sys.stderr)
            return 2
        result = editor.edit(args.image, args.instruction, variants=args.variants, seed=args.seed,
                             steps=args.steps, guidance=args.guidance, image_guidance=args.image_guidance)
    except EditorInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    records = result.records_json()
    for rec, img in zip(records, result.images):
        name = f"variant_{rec['index']}_seed{rec['seed']}.png"
        save_png_atomic(img, out / name)
        rec["file"] = name
    write_json_atomic(out / "variants.json", {"source": str(args.image), "variants": records})
    if args.json:
        print_json({"out": str(out), "files": [r["file"] for r in records]})
    else:
        print(f"wrote {len(records)} variants to {out}")
    return 0


def _edit_dataset(editor, data: Path, out: Path, args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from hive.data import read_metadata
    from hive.editor import load_image
    from hive.files import save_png_atomic, write_jsonl_atomic

    rows = read_metadata(data)
    (out / "images").mkdir(parents=True, exist_ok=True)
    results = []
    batch = max(1, args.batch)
    seed = args.seed if args.seed is not None else 0
    for start in tqdm(range(0, len(rows), batch), desc="edit dataset"):
        chunk = rows[start:start + batch]
        sources = [load_image(data / r["input_image"]) for r in chunk]
        prompts = [editor.prompt_for(r["edit_prompt"]) for r in chunk]
        seeds = [[seed + (start + j) * args.variants + k for k in range(args.variants)] for j in range(len(chunk))]
        outs = editor.sample(sources, prompts, seeds, args.steps, args.guidance, args.image_guidance)
        for r, imgs, ss in zip(chunk, outs, seeds):
            paths = []
            for k, img in enumerate(imgs):
                rel = f"images/{r['id']}_{k}.png"
                save_png_atomic(img, out / rel)
                paths.append(rel)
            results.append({"id": r["id"], "output_images": paths, "seeds": ss,
                            "mask_threshold": editor.mask_threshold})
    write_jsonl_atomic(out / "metadata.jsonl", results)
    if args.json:
        print_json({"out": str(out), "rows": len(results)})
    else:
        print(f"edited {len(results)} rows into {out / 'metadata.jsonl'}")
    return 0


# ---------------------------------------------------------------- evaluate and bench
def cmd_evaluate(args: argparse.Namespace) -> int:
    from hive.editor import Editor
    from hive.evaluate import (
        blind_pairwise, evaluate_toy, grid_by_kind, pairwise_ceiling, plot_tradeoff, tradeoff_curve,
        wins_per_loss_text,
    )
    from hive.files import write_json_atomic

    out = Path(args.out) if args.out else None
    if args.ceiling and (args.no_judge or out is None):
        print("error: --ceiling reads the judge's verdicts: give --out and leave out --no-judge", file=sys.stderr)
        return 2
    try:
        editor = Editor(args.model, mask_threshold=args.mask_threshold)
        other = Editor(args.against, mask_threshold=args.mask_threshold) if args.against else None
        report: dict = {"model": editor.model}
        if not args.no_judge:
            report = evaluate_toy(editor=editor, n=args.n, seed=args.seed, steps=args.steps, guidance=args.guidance,
                                  image_guidance=args.image_guidance, batch=args.batch, out=out)
        if args.ceiling:
            report["pairwise_ceiling"] = pairwise_ceiling(out / "judgements.jsonl", annotators=args.annotators,
                                                          noise=args.annotator_noise)
            write_json_atomic(out / "report.json", report)
        if args.tradeoff:
            curves = {}
            for ed in [editor] + ([other] if other else []):
                label = Path(ed.model).name or ed.model
                curves[label if label not in curves else ed.model] = tradeoff_curve(
                    ed, n=args.tradeoff_n, guidance=args.guidance, steps=args.steps, clip=args.clip, batch=args.batch)
            png = plot_tradeoff(curves, Path(args.tradeoff))
            write_json_atomic(png.with_suffix(".json"), curves)
            report["tradeoff"] = {"png": str(png), "curves": curves}
        if args.grid:
            report["grid"] = str(grid_by_kind(editor, Path(args.grid), steps=args.steps))
        if other is not None:
            report["pairwise"] = blind_pairwise(editor, other, n=args.pairwise_n or args.n, annotators=args.annotators,
                                                noise=args.annotator_noise, steps=args.steps, guidance=args.guidance,
                                                image_guidance=args.image_guidance, batch=args.batch,
                                                out=out / "pairwise" if out else None)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print_json(report)
        return 0
    if "success" in report:
        print(f"judge success {report['success']:.1%} on {report['n']} fresh toy edits")
        for kind, v in report["per_kind"].items():
            print(f"  {kind:<11} {v['success']:.1%}  (n={v['n']})")
    for name, curve in report.get("tradeoff", {}).get("curves", {}).items():
        print(f"trade-off of {name} (n={curve['n']}): image guidance -> CLIP image sim, directional sim, judge")
        for p in curve["points"]:
            print(f"  {p['image_guidance']:.1f}  {p['image_similarity']:.3f}  {p['directional_similarity']:.3f}  "
                  f"{p['success']:.1%}")
    if "tradeoff" in report:
        print(f"wrote {report['tradeoff']['png']}")
    if "grid" in report:
        print(f"wrote {report['grid']}")
    if "pairwise_ceiling" in report:
        c = report["pairwise_ceiling"]
        ratio = wins_per_loss_text(c["wins_per_loss"])
        print(f"ceiling of a blind comparison against this model ({c['annotators']} simulated annotators, the clean "
              f"target, mean of {c['repeats']} draws): win {c['win_rate']:.1%}, tie {c['tie_rate']:.1%}, "
              f"loss {c['loss_rate']:.1%} ({ratio})")
    if "pairwise" in report:
        r = report["pairwise"]
        print(f"blind pairwise, {r['model_a']} vs {r['model_b']} on {r['n']} edits, {r['annotators']} simulated "
              f"annotators each (95% Wilson CIs):")
        for key, count in (("win", "wins"), ("tie", "ties"), ("loss", "losses")):
            lo, hi = r[f"{key}_ci"]
            print(f"  {key:<4} {r[count]:>4}  {r[key + '_rate']:.1%}  [{lo:.1%}, {hi:.1%}]")
    return 0


def _print_bench(args: argparse.Namespace, result: dict) -> None:
    if args.json:
        print_json(result)
        return
    for k, v in result.items():
        print(f"{k}: {v}")
    print(f"reference {result['reference_s']:.3f} s, ours {result['ours_s']:.3f} s: {result['speedup']:.2f}x")
    if "ours_blend_s" in result:
        print(f"ours with the model's local blend (mask threshold {result['mask_threshold']}): "
              f"{result['ours_blend_s']:.3f} s")


def cmd_bench_edit(args: argparse.Namespace) -> int:
    from dataclasses import replace

    import torch

    from hive.bench import bench_edit
    from hive.fastpath import FastOptions

    device = "cuda" if torch.cuda.is_available() else "cpu"
    options = FastOptions.for_device(device)
    if args.compile is not None:  # the GPU: torch.compile; the CPU: the UNet's ahead-of-time package
        options = options.with_compile(args.compile, device)
    for name in ("channels_last", "fuse_qkv", "compile_mode"):
        if getattr(args, name) is not None:
            options = replace(options, **{name: getattr(args, name)})
    result = bench_edit(args.model, variants=args.variants, steps=args.steps, repeats=args.repeats,
                        record_result=not args.no_record, config=args.config, fast_options=options,
                        threads=args.threads)
    _print_bench(args, result)
    return 0


def cmd_bench_train(args: argparse.Namespace) -> int:
    from hive.bench import bench_train

    result = bench_train(args.model, config=args.config, batch=args.batch, resolution=args.resolution,
                         repeats=args.repeats, record_result=not args.no_record, compile=args.compile,
                         channels_last=args.channels_last, compile_mode=args.compile_mode, threads=args.threads)
    _print_bench(args, result)
    return 0


# ---------------------------------------------------------------- reward model (hive.reward, hive.simulate, ...)
def _floats(text: str) -> list[float]:
    """argparse type: "1.2,1.6,2" -> [1.2, 1.6, 2.0]."""
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None


def cmd_simulate(args: argparse.Namespace) -> int:
    from hive.simulate import calibration_report, simulate

    if args.calibrate_only:
        report = calibration_report(n=args.requests, variants=args.variants, target=args.target_agreement)
        if args.json:
            print_json(report)
        else:
            print(f"noise {report['noise']:.4f}: one simulated annotator agrees with the noise-free order on "
                  f"{report['agreement']:.1%} of pairs ({report['n']} toy edits, stand-in variants, no editor)")
        return 0
    from hive.editor import Editor

    try:
        editor = None if args.stand_in else Editor(args.model, mask_threshold=args.mask_threshold)
        rep = simulate(editor, args.requests, args.variants, annotators=args.annotators, per_request=args.per_request,
                       noise=args.noise, target=args.target_agreement, seed=args.seed, steps=args.steps,
                       guidance=args.guidance, image_guidance=args.image_guidance, batch=args.batch,
                       variant_image_guidance=args.variant_image_guidance,
                       variant_mask_threshold=args.variant_mask_threshold)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from dataclasses import asdict

    out = asdict(rep)
    out.pop("request_ids")
    if args.json:
        print_json(out)
    else:
        print(f"wrote {rep.rankings} simulated rankings of {rep.requests} requests x {rep.variants} variants; "
              f"noise {rep.noise:.4f}{' (calibrated)' if rep.calibrated else ''}: one annotator agrees with the "
              f"noise-free order on {rep.single_annotator_agreement:.1%} of {rep.pairs_compared} pairs; "
              f"ties {rep.tie_rate:.1%}")
    return 0


def _reward_config(args: argparse.Namespace):
    import dataclasses

    from hive.train_reward import RewardTrainConfig

    # every option named like a RewardTrainConfig field (reward_train_args); options left unset take
    # the config's defaults (the measured best, see docs/reward.md)
    names = [f.name for f in dataclasses.fields(RewardTrainConfig)]
    values = {k: getattr(args, k) for k in names if getattr(args, k, None) is not None}
    if isinstance(values.get("patch_layers"), str):
        values["patch_layers"] = [int(x) for x in values["patch_layers"].split(",")]
    return RewardTrainConfig(**values)


def cmd_train_reward(args: argparse.Namespace) -> int:
    from hive.train_reward import imported_export, rankings_from_db, register, train_reward

    config = _reward_config(args)
    config.include_simulated = not args.humans_only
    config.skip_all_bad = args.skip_all_bad
    out = Path(args.out)
    try:
        if args.data:
            with imported_export(Path(args.data)) as (url, home):
                rankings = rankings_from_db(url, home, include_simulated=config.include_simulated,
                                            consented_only=not args.include_unconsented)
                report = train_reward(rankings, out, config)
        else:
            rankings = rankings_from_db(include_simulated=config.include_simulated,
                                        consented_only=not args.include_unconsented)
            report = train_reward(rankings, out, config)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report["model"] = str(out / "model")
    if not args.no_register:
        report["model_version_id"] = register(out / "model", report, name=args.name)
    if args.json:
        print_json(report)
    else:
        def pct(x):
            return "n/a" if x is None else f"{x:.1%}"
        print(f"saved {out / 'model'}; held-out pairs: {pct(report['heldout_pair_accuracy'])} (ties excluded), "
              f"{pct(report['heldout_pair_accuracy_with_ties'])} (ties included)")
        print(f"vs {report['accuracy_reference']}: reward {pct(report['true_pair_accuracy'])}, one annotator "
              f"{pct(report['single_annotator_accuracy'])}, CLIP direction {pct(report['clip_direction_accuracy'])}, "
              f"random {pct(report['random_accuracy'])}")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from hive.score import score_dataset

    try:
        path = score_dataset(Path(args.data), Path(args.reward), Path(args.out) if args.out else None,
                             batch_size=args.batch, column=args.column)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print_json({"rewards": str(path)})
    else:
        print(f"wrote {path}")
    return 0


def cmd_reward_experiment(args: argparse.Namespace) -> int:
    from hive.train_reward import run_experiment

    curve = [int(x) for x in args.curve.split(",")] if args.curve else None
    try:
        report = run_experiment(Path(args.out), args.model, stand_in=args.stand_in, requests=args.requests,
                                test_requests=args.test_requests, variants=args.variants, annotators=args.annotators,
                                curve=curve, config=_reward_config(args), steps=args.sample_steps, batch=args.batch,
                                sim_dir=Path(args.sim) if args.sim else None, resample=args.resample,
                                repeats=args.repeats, noise_free_bound=args.noise_free_bound,
                                variant_image_guidance=args.variant_image_guidance,
                                variant_mask_threshold=args.variant_mask_threshold)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print_json(report)
    else:
        print((Path(args.out) / "report.md").read_text())
    return 0


# ---------------------------------------------------------------- the parser
VARIANT_MASK_THRESHOLD_HELP = ("one local-blend mask threshold per variant (e.g. 0,0.2,0.35,0.5; 0: the raw output): "
                               "variants that differ more, so more of the pairs annotators rank are not equally good "
                               "(default: every variant at the editor's setting)")
VARIANT_IMAGE_GUIDANCE_HELP = ("one image guidance per variant (e.g. 1.2,1.6,2,2.4): variant v of every request is "
                               "sampled at its own value (default: every variant at the model's setting)")


def build_parser() -> argparse.ArgumentParser:
    from hive.defaults import DEFAULT_GUIDANCE, DEFAULT_IMAGE_GUIDANCE, DEFAULT_STEPS

    parser = argparse.ArgumentParser(prog="python -m hive", description="HIVE: instruction-guided image editing "
                                     "that learns from human feedback.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def sampling_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", default=None, help="pipeline folder or hub id (default: $HIVE_MODEL or the "
                       "embedded toy editor)")
        p.add_argument("--steps", type=int, default=None,
                       help=f"denoising steps (default: the model's hive.json `sampling`, else {DEFAULT_STEPS})")
        p.add_argument("--guidance", type=float, default=None,
                       help=f"text guidance (default: the model's, else {DEFAULT_GUIDANCE})")
        p.add_argument("--image-guidance", type=float, default=None,
                       help=f"image guidance (default: the model's, else {DEFAULT_IMAGE_GUIDANCE})")
        p.add_argument("--mask-threshold", type=float, default=None,
                       help="local blend: keep the source outside the instruction's mask (hive.local_blend); "
                       "0 turns it off (default: the model's, else off)")

    # toy
    toy = sub.add_parser("toy", help="the toy world").add_subparsers(dest="toy_command", required=True,
                                                                     metavar="SUBCOMMAND")
    p = toy.add_parser("sample", help="write a toy edit dataset (metadata.jsonl + PNGs)")
    p.add_argument("--n", type=int, required=True, help="number of examples")
    p.add_argument("--seed", type=int, default=0, help="first seed; example k uses seed+k")
    p.add_argument("--noise", type=float, default=0.0, help="probability that a target is corrupted (0..1)")
    p.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.set_defaults(func=cmd_toy_sample)

    # train
    train = sub.add_parser("train", help="train a piece of the toy zoo").add_subparsers(
        dest="train_command", required=True, metavar="PIECE")
    p = train.add_parser("tokenizer", help="generate the CLIP tokenizer from the toy vocabulary")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_train_tokenizer)
    p = train.add_parser("vae", help="train the tiny AutoencoderKL on toy scenes")
    p.add_argument("--out", required=True, help="run folder (checkpoints, loss.jsonl, model/)")
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--batch-size", type=int, default=64, help="images per step (each a random 32 px crop)")
    p.add_argument("--init", help="continue from this AutoencoderKL folder")
    p.add_argument("--latent-channels", type=int, default=16, help="latent channels of a fresh autoencoder")
    p.add_argument("--decoder-only", action="store_true",
                   help="with --init: train the decoder alone, so the latent space (and editors trained on it) stay valid")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_train_vae)
    p = train.add_parser("decoder", help="fine-tune an editor's VAE decoder on the latents the editor samples "
                                         "(the encoder, and so the UNet, stay valid)")
    p.add_argument("--editor", default="models/toy-editor", help="editor pipeline folder")
    p.add_argument("--out", required=True,
                   help="run folder (latents/, checkpoints, loss.jsonl, metrics.json, model/, pipeline/)")
    p.add_argument("--edits", type=int, default=3000, help="toy training edits to sample (one variant each)")
    p.add_argument("--sample-batch", type=int, default=32, help="edits per pipeline call while sampling")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-4, help="peak learning rate, falling linearly to 0")
    p.add_argument("--object-boost", type=float, default=1.0,
                   help="extra loss weight of object pixels (the toy VAE was trained with 9)")
    p.add_argument("--recon-share", type=float, default=0.5,
                   help="share of each batch that are clean targets' own latents")
    p.add_argument("--crop", type=int, default=8, help="train on random crops of this many latent cells (0: whole)")
    p.add_argument("--held-out", type=int, default=500, help="last sampled edits kept out of training and judged")
    p.add_argument("--checkpoint-every", type=int, default=200)
    p.add_argument("--max-sample-minutes", type=float, help="sample fewer edits if this time runs out")
    p.add_argument("--max-minutes", type=float, help="stop training early when this time runs out")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_train_decoder)
    p = train.add_parser("clip", help="train the tiny CLIP on toy scenes and captions")
    p.add_argument("--out", required=True, help="run folder (checkpoints, loss.jsonl, model/)")
    p.add_argument("--tokenizer", required=True, help="tokenizer folder (from `train tokenizer`)")
    p.add_argument("--steps", type=int, default=700)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--base", help="continue from this CLIPModel folder (default: a fresh toy CLIP)")
    p.add_argument("--twins", action="store_true",
                   help="each scene comes with twins that differ in one object's position, shape or size, and "
                        "a contrastive loss inside each group (hard negatives)")
    p.add_argument("--edits", action="store_true",
                   help="train on groups of clean toy edits of one scene: captions of the edited images plus "
                        "CLIP directional similarity against the instructions (a reward backbone that sees changes)")
    p.add_argument("--checkpoint-every", type=int, default=500)
    p.add_argument("--decay-steps", type=int, default=0,
                   help="the learning rate falls linearly to 0 over the last N steps (0: constant)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_train_clip)
    p = train.add_parser("editor", help="SFT-train an InstructPix2Pix UNet (resumes from OUT/checkpoints)")
    p.add_argument("--out", required=True, help="run folder (checkpoints, loss.jsonl, pipeline/)")
    p.add_argument("--base", help="pipeline folder or hub id to start from")
    p.add_argument("--vae", help="with --clip: start a fresh toy UNet on this VAE folder")
    p.add_argument("--clip", help="CLIP folder whose text tower and tokenizer the editor uses (with --base: "
                   "replaces the base's text encoder)")
    p.add_argument("--data", help="dataset folder with metadata.jsonl (default: endless fresh toy edits)")
    p.add_argument("--toy-noise", type=float, default=0.0, help="corruption rate of the toy stream")
    p.add_argument("--kind-weights", help="draw toy edit kinds unevenly, e.g. resize=3,add=2 (others 1)")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--no-ema", action="store_true")
    p.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"])
    p.add_argument("--checkpoint-every", type=int, default=250)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--channels-last", action="store_true", help="NHWC weights (pays on GPUs; bench train)")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet (kernels cached on disk)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader processes that build batches ahead")
    p.add_argument("--min-snr-gamma", type=float, default=5.0, help="min-SNR loss weighting; 0 turns it off")
    p.add_argument("--max-minutes", type=float, help="stop (checkpoint + pipeline) after this many minutes; rerun to continue")
    p.add_argument("--decay-steps", type=int, default=0,
                   help="cool the learning rate linearly to 0 over the last N of --steps (0: constant after warmup)")
    p.add_argument("--high-noise-bias", type=float, default=0.0,
                   help="draw more high-noise timesteps (0: uniform; the toy recipe uses 1)")
    p.add_argument("--change-weight", type=float, default=0.0,
                   help="extra loss weight on latent pixels the edit changes (the toy recipe uses 4)")
    p.add_argument("--pixel-loss-weight", type=float, default=0.0,
                   help="weight of a squared-error loss on the decoded clean-latent estimate, in pixels, where the edit "
                   "changes the image (0: off)")
    p.add_argument("--pixel-loss-min-signal", type=float, default=0.0,
                   help="the pixel loss counts only where alpha_bar_t is at least this (0: at every timestep)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_train_editor)

    p = train.add_parser("add-attention", help="an editor pipeline with attention added at its UNet's finest "
                         "level (new blocks start as a no-op), to train further")
    p.add_argument("--base", required=True, help="editor pipeline folder")
    p.add_argument("--out", required=True, help="pipeline folder to write")
    p.add_argument("--place", choices=["down", "up", "both"], default="down",
                   help="the first down block, the last up block, or both")
    p.add_argument("--cross-only", action="store_true", help="attend to the instruction only (no self-attention)")
    p.set_defaults(func=cmd_train_add_attention)

    p = train.add_parser("export", help="write the newest checkpoint of an editor run as a pipeline folder")
    p.add_argument("--run", required=True, help="run folder of `train editor`")
    p.add_argument("--out", required=True, help="pipeline folder to write")
    p.add_argument("--no-ema", action="store_true", help="export the raw weights, not the EMA")
    p.set_defaults(func=cmd_train_export)
    p = train.add_parser("ship", help="install a trained editor and CLIP as the embedded default (models/)")
    p.add_argument("--editor", required=True, help="editor pipeline folder")
    p.add_argument("--clip", required=True, help="CLIP folder")
    p.add_argument("--models", help="models folder (default: the repo's models/)")
    p.add_argument("--vae", help="replace the editor's VAE by this one (same encoder, e.g. `train vae --decoder-only`)")
    p.add_argument("--guidance", type=float, help="the editor's default text guidance (hive.json `sampling`)")
    p.add_argument("--image-guidance", type=float, help="the editor's default image guidance")
    p.add_argument("--steps", type=int, help="the editor's default denoising steps")
    p.add_argument("--mask-threshold", type=float, help="the editor's default local blend threshold (0: off)")
    p.set_defaults(func=cmd_train_ship)

    # edit
    p = sub.add_parser("edit", help="edit one image (K variants) or every row of a dataset")
    p.add_argument("--image", help="the image to edit")
    p.add_argument("--instruction", help="what to change, e.g. 'make the red circle blue'")
    p.add_argument("--data", help="dataset folder with metadata.jsonl: edit every row")
    p.add_argument("--variants", type=int, default=4, help="variants per edit (1-8, default 4)")
    p.add_argument("--seed", type=int, default=None, help="seed of variant 0; variant i uses seed+i")
    p.add_argument("--batch", type=int, default=16, help="with --data: rows per pipeline call")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--json", action="store_true")
    sampling_args(p)
    p.set_defaults(func=cmd_edit)

    # evaluate
    p = sub.add_parser("evaluate", help="judge success per edit kind on fresh toy edits; CLIP trade-off plot; "
                       "blind pairwise comparison with another editor")
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--seed", type=int, default=900_000_000, help="first evaluation seed (never used in training)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--out", help="folder for outputs and the report")
    p.add_argument("--no-judge", action="store_true", help="skip the per-kind judge evaluation")
    p.add_argument("--grid", metavar="PNG", help="a picture grid of the model's default sampling: one edit of each "
                   "kind (evaluation seeds), source | instruction | clean target | 4 variants with the judge's verdict")
    p.add_argument("--tradeoff", metavar="PNG", help="plot the CLIP trade-off over image guidance 1.0-2.2 (of "
                   "--model, and of --against if given) to PNG; the curves go to PNG with a .json suffix")
    p.add_argument("--tradeoff-n", type=int, default=100, help="toy edits per trade-off point (default %(default)s)")
    p.add_argument("--clip", help="CLIPModel folder or hub id for the trade-off (default: the toy CLIP)")
    p.add_argument("--against", metavar="MODEL", help="blind pairwise comparison of --model (A) against MODEL (B), "
                   "judged by simulated annotators; win/tie/loss with 95%% Wilson intervals")
    p.add_argument("--pairwise-n", type=int, default=None, help="inputs of the blind comparison (default: --n)")
    p.add_argument("--annotators", type=int, default=3, help="simulated annotators per blind comparison input")
    p.add_argument("--annotator-noise", type=float, default=None, help="simulated annotators' noise (default: "
                   "hive.evaluate.PAIRWISE_NOISE, one annotator agrees with the true order on 72%% of pairs)")
    p.add_argument("--ceiling", action="store_true", help="the blind comparison's ceiling against --model: how "
                   "often the toy world's clean target would win / tie / lose against its judged outputs before the "
                   "same annotators (expected over 100 draws of their noise); needs the judge and --out")
    p.add_argument("--json", action="store_true")
    sampling_args(p)
    p.set_defaults(func=cmd_evaluate)

    # bench
    bench = sub.add_parser("bench", help="speed benchmarks against the plain diffusers reference").add_subparsers(
        dest="bench_command", required=True, metavar="WHAT")
    def bench_common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", default="toy", choices=["toy", "sd15", "sd15-tiny"],
                       help="toy: the toy zoo (or --model); sd15: SD-1.5-shaped random weights; sd15-tiny: for tests")
        p.add_argument("--model", default=None, help="with --config toy: pipeline folder (default: the toy editor)")
        p.add_argument("--repeats", type=int, default=5, help="timed runs of each, interleaved (median)")
        p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
        p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                       help="torch.compile ours (default: where it pays, see docs/speed.md)")
        p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None)
        p.add_argument("--compile-mode", default=None, help="inductor mode, e.g. max-autotune-no-cudagraphs")
        p.add_argument("--no-record", action="store_true", help="do not write bench/results/*.json")
        p.add_argument("--json", action="store_true")

    p = bench.add_parser("edit", help="K variants of one edit: ours vs a plain diffusers pipeline call")
    bench_common(p)
    p.add_argument("--variants", type=int, default=4)
    p.add_argument("--steps", type=int, default=None, help="default: the model's (hive.json `sampling`)")
    p.add_argument("--fuse-qkv", action=argparse.BooleanOptionalAction, default=None)
    p.set_defaults(func=cmd_bench_edit)
    p = bench.add_parser("train", help="one SFT step of the UNet: ours vs diffusers' InstructPix2Pix training step")
    bench_common(p)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--resolution", type=int, default=None, help="pixels (default: 256 for sd15, the model's for toy)")
    p.set_defaults(func=cmd_bench_train)

    # reward model: simulated annotators, training, scoring, the toy experiment
    p = sub.add_parser("simulate", help="toy requests ranked by simulated annotators (judge + noise), into the db")
    p.add_argument("--requests", type=int, default=100, help="toy edit requests")
    p.add_argument("--variants", type=int, default=4, help="variants per request (2-8)")
    p.add_argument("--annotators", type=int, default=1, help="simulated annotator users")
    p.add_argument("--per-request", type=int, default=1, help="annotators ranking each request")
    p.add_argument("--noise", type=float, default=None,
                   help="annotator noise (default: calibrated to --target-agreement on the sampled variants)")
    p.add_argument("--target-agreement", type=float, default=0.72,
                   help="one annotator vs the noise-free order, fraction of pairs (default %(default)s)")
    p.add_argument("--seed", type=int, default=500_000_000, help="first toy seed")
    p.add_argument("--batch", type=int, default=8, help="requests per pipeline call")
    p.add_argument("--stand-in", action="store_true", help="variants from the toy noise model (clean, unchanged, "
                   "corrupted targets) instead of the editor")
    p.add_argument("--calibrate-only", action="store_true",
                   help="calibrate the noise on stand-in variants (clean, corrupted, unchanged), no editor, no writes")
    p.add_argument("--json", action="store_true")
    sampling_args(p)
    p.add_argument("--variant-image-guidance", metavar="G1,G2,...", type=_floats, help=VARIANT_IMAGE_GUIDANCE_HELP)
    p.add_argument("--variant-mask-threshold", metavar="T1,T2,...", type=_floats, help=VARIANT_MASK_THRESHOLD_HELP)
    p.set_defaults(func=cmd_simulate)

    def reward_train_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--backbone", default=None, help="CLIP folder or hub id (default: models/toy-clip-edits, the toy CLIP trained on edits; "
                       "openai/clip-vit-large-patch14 for real photos)")
        p.add_argument("--loss", choices=["bt", "pl"], default="bt",
                       help="bt: Bradley-Terry over all pairs of a ranking (ties 0.5); pl: Plackett-Luce")
        # defaults (None here): RewardTrainConfig in hive/train_reward.py
        p.add_argument("--steps", type=int, help="most training steps (per ensemble member)")
        p.add_argument("--batch-size", type=int, help="rankings per step")
        p.add_argument("--lr", type=float, help="backbone learning rate")
        p.add_argument("--head-lr", type=float, help="heads' learning rate (AdamW; default 1e-2, the start of --head-lr-decay)")
        p.add_argument("--head-lr-decay", choices=["constant", "cosine"],
                       help="heads' rate over the steps: cosine (default) down to 0 at --steps, or constant")
        p.add_argument("--freeze-layers", type=int,
                       help="freeze embeddings and the lowest N layers of both towers (-1, default: the whole "
                            "backbone; the heads then train on features computed once)")
        p.add_argument("--head-type", choices=["change", "global"],
                       help="change: pooled change + patch-difference tokens + text cross-attention; global: pooled")
        p.add_argument("--patch-layers", help="vision hidden states compared patchwise, e.g. -1 or 0,-1")
        p.add_argument("--text-token-layer", type=int,
                       help="text hidden state the change head's cross-attention reads (-1: last; 0: embeddings; "
                            "default: 0 with a toy backbone, -1 otherwise)")
        p.add_argument("--hidden", type=int, help="head width")
        p.add_argument("--dropout", type=float, help="heads' dropout (default 0)")
        p.add_argument("--gate-l2", type=float,
                       help="change head: L2 penalty on the instruction's weights of the main term (default 0)")
        p.add_argument("--residual-l2", type=float,
                       help="change head: L2 penalty on the residual branch's weights (default 0; before session 13: "
                            "dropout 0.1, --gate-l2 0.3, --residual-l2 0.001)")
        p.add_argument("--ensemble", type=int, help="heads averaged (each validates on its own fold)")
        p.add_argument("--residual", action=argparse.BooleanOptionalAction, default=None,
                       help="change head: also read the CLIP patch and pooled features (tokens, cross-attention, "
                            "MLP) beside the main term")
        p.add_argument("--direction-prior", type=float,
                       help="change head: a term for the backbone's CLIP directional similarity to the instruction, "
                            "with this starting weight (default 1; 0: none)")
        p.add_argument("--speck-prior", type=float,
                       help="change head: a term for the share of specks (changed pixels outside any 3x3 block of "
                            "changed pixels: dots, thin rims, ghosts), standardised, with this starting weight "
                            "(default 0: none)")
        p.add_argument("--dataset-rankings", type=int,
                       help="rankings implied by the toy edit dataset (its target above three corruptions of it) "
                            "added to the training rankings, never to validation or test (default: 1000 with a "
                            "toy backbone, 0 otherwise; see hive/dataset_rankings.py)")
        p.add_argument("--dataset-noise", type=float,
                       help="training noise of the edit dataset behind --dataset-rankings (default 0: clean targets; "
                            "the paper experiment uses its SFT noise, 0.3)")
        p.add_argument("--dataset-mistakes", action=argparse.BooleanOptionalAction, default=None,
                       help="make the last of each dataset ranking's corruptions an editor's mistake (the named "
                            "colour, place or change on another object; a move drawn as a copy; an add elsewhere)")
        p.add_argument("--locator-examples", type=int,
                       help="toy edit triplets to fit the change head's change locator on (where the instruction "
                            "should change the source). Default: 20000 with a toy backbone, the change head and a "
                            "frozen backbone (the fit ships in models/toy-clip-edits/change-locator), else 0; "
                            "0 turns it off (hive/change_locator.py, docs/reward.md)")
        p.add_argument("--locator-steps", type=int,
                       help="steps of the change locator's fit (default 4000; a new setting fits once, ~20 min on "
                            "two CPU threads, kept under $HIVE_HOME/cache)")
        p.add_argument("--locator-pixels", action=argparse.BooleanOptionalAction, default=None,
                       help="the change locator also reads the source's pixels through a small conv stem, "
                            "which sees each object's shape and size (hive/change_locator.py)")
        p.add_argument("--direction-examples", type=int,
                       help="captioned toy edit triplets to fit the direction predictor on (the caption direction "
                            "an instruction asks for, which the direction prior then reads instead of the "
                            "instruction's own CLIP features; e.g. 20000; hive/direction_predictor.py). Default 0")
        p.add_argument("--val-fraction", type=float, help="train requests held out for early stopping (0: none)")
        p.add_argument("--patience", type=int, help="validations without improvement before stopping")
        p.add_argument("--one-se-rule", action=argparse.BooleanOptionalAction, default=None,
                       help="heads: keep the earliest validated state within one standard error of the best "
                            "validation loss (default on; --no-one-se-rule: the best)")
        p.add_argument("--eval-every", type=int, help="steps between validations (0: one epoch)")
        p.add_argument("--test-fraction", type=float, help="held-out requests")
        p.add_argument("--checkpoint-every", type=int)
        p.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"])
        p.add_argument("--seed", type=int)
        p.add_argument("--json", action="store_true")

    p = sub.add_parser("train-reward", help="train the reward model on rankings (db or export); register it")
    p.add_argument("--out", default="runs/reward", help="run folder (checkpoints, loss.jsonl, model/, metrics.json)")
    p.add_argument("--data", help="an exported dataset (python -m hive export) instead of the database")
    p.add_argument("--name", help="model version name in the registry (default: reward-<time>)")
    p.add_argument("--no-register", action="store_true", help="do not record a reward model version")
    p.add_argument("--humans-only", action="store_true", help="leave simulated rankings out")
    p.add_argument("--include-unconsented", action="store_true", help="also requests without training consent")
    p.add_argument("--skip-all-bad", action="store_true", help="leave out rankings marked 'all bad'")
    reward_train_args(p)
    p.set_defaults(func=cmd_train_reward)

    p = sub.add_parser("score", help="reward of every row of a triplet dataset -> DIR/rewards.jsonl")
    p.add_argument("--data", required=True, help="dataset folder with metadata.jsonl")
    p.add_argument("--reward", required=True, help="reward model folder")
    p.add_argument("--out", help="output file (default DATA/rewards.jsonl)")
    p.add_argument("--column", default="edited_image", help="image column to score (default %(default)s)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("reward-experiment", help="toy experiment: simulate, train over a learning curve, "
                       "compare with one annotator, CLIP direction and random; report + figure")
    p.add_argument("--out", required=True, help="experiment folder (its own store under OUT/home)")
    p.add_argument("--requests", type=int, default=300, help="training requests (largest curve point)")
    p.add_argument("--test-requests", type=int, default=300,
                   help="held-out requests (default %(default)s: ~700 untied pairs on the toy simulations; 100 give a "
                        "third as many, too few to tell models apart)")
    p.add_argument("--variants", type=int, default=4)
    p.add_argument("--annotators", type=int, default=5)
    p.add_argument("--curve", default="5,50,100,200,300", help="training request counts (default %(default)s)")
    p.add_argument("--model", default=None, help="editor pipeline (default: the embedded toy editor)")
    p.add_argument("--sample-steps", type=int, default=20, help="editor denoising steps")
    p.add_argument("--batch", type=int, default=8, help="requests per pipeline call")
    p.add_argument("--stand-in", action="store_true", help="variants from the toy noise model instead of the editor "
                   "(an editor-free check of the reward model)")
    p.add_argument("--sim", help="the simulated store (default OUT/home): sampled once, reused by later runs with "
                   "the same settings and editor; or an exported dataset of one")
    p.add_argument("--resample", action="store_true", help="sample the simulation again (e.g. the editor changed)")
    p.add_argument("--repeats", type=int, default=3,
                   help="reward models per curve size (other training subsets and seeds); the report gives the mean")
    p.add_argument("--variant-image-guidance", metavar="G1,G2,...", type=_floats, help=VARIANT_IMAGE_GUIDANCE_HELP)
    p.add_argument("--variant-mask-threshold", metavar="T1,T2,...", type=_floats, help=VARIANT_MASK_THRESHOLD_HELP)
    p.add_argument("--noise-free-bound", action="store_true",
                   help="also train on the noise-free order of the largest subset: what the model's features "
                        "can learn at best from that many requests")
    reward_train_args(p)
    p.set_defaults(func=cmd_reward_experiment)

    from hive.loop import add_commands as add_loop_commands  # finetune, loop, promote, rollback, models

    add_loop_commands(sub)

    try:
        from db.cli import register as register_db
    except ImportError:
        register_db = None
    if register_db is not None:
        register_db(sub)
    try:
        from hive_app.cli import register as register_app
    except ImportError:  # the app's extra dependencies (gradio) are not installed
        register_app = None
    if register_app is not None:
        register_app(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)
