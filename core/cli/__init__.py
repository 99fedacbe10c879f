"""``python -m core <command>``: the pipeline from the command line, with progress bars.

Commands (names and flags are a contract): train-diffusion, score, categorize, train-classifier,
sample, evaluate, neighbours, explain, data, build, build-demo, import-adm, import-adm-classifier. Every run also works under ``accelerate launch`` / ``torchrun``: work is split with
accelerate's ``split_between_processes`` and gathered with ``gather_object``; only the main
process writes. Errors in the user's input end the command with one line on stderr and exit 2.
"""
from __future__ import annotations

import argparse
from typing import Optional

from core.errors import MinorityError
from core.maths.sampling import SAMPLERS as SAMPLER_NAMES
from core.maths.score import DISTANCES
from core.cli.common import (EXIT_USER_ERROR, _fail, _Parser, add_stream_flags, check_output, close_bars, finite_float,
                             seed_int)
from core.cli.data import cmd_build, cmd_build_demo, cmd_data_faces, cmd_data_mri_phantom
from core.cli.importers import cmd_import_adm, cmd_import_adm_classifier
from core.cli.evaluate import cmd_evaluate, cmd_neighbours
from core.cli.sample import cmd_sample
from core.cli.explain import cmd_explain
from core.cli.scores import cmd_score
from core.cli.train import cmd_categorize, cmd_train_classifier, cmd_train_diffusion

__all__ = ["main", "build_parser", "EXIT_USER_ERROR"]


# ----------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m core", description="Minority score, minority classifier and guided sampling.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    dd = sub.add_parser("data", help="build a built-in data set")
    dsub = dd.add_subparsers(dest="dataset", required=True, parser_class=_Parser)
    for name, helptext, n, func in (
            ("mri-phantom", "long-tailed brain-MRI atrophy slices from nilearn's MNI152 templates", 6000, cmd_data_mri_phantom),
            ("faces", "colour cartoon faces with independent long-tailed attributes and a rarity column", 8000, cmd_data_faces)):
        dp = dsub.add_parser(name, help=helptext)
        dp.add_argument("--out", required=True)
        dp.add_argument("--n", type=int, default=n)
        dp.add_argument("--size", type=int, default=32)
        dp.add_argument("--seed", type=seed_int, default=0)
        if name == "mri-phantom":
            dp.add_argument("--masks", default=None, help="also write each slice's masks here, outside --out: "
                                                          "changed/NNNNN.png (the tissue the atrophy changed) and "
                                                          "brain/NNNNN.png (issue 27's measurements)")
        dp.set_defaults(func=func)

    b = sub.add_parser("build", help="any image or NIfTI folder to a bundle: model, score, classes, classifier, map")
    b.add_argument("--data", required=True, help="image folder (any mode and size), NIfTI folder, or class sub-folders; "
                                                 "an optional metadata.csv (path + numeric columns) travels along")
    b.add_argument("--out", required=True, help="bundle folder")
    b.add_argument("--model", default=None, help="use this diffusion model (run folder, diffusers folder or hub id) "
                                                 "instead of training one; size, channels and schedule come from it")
    b.add_argument("--size", type=int, default=None, help="image side (default 32, or the --model's)")
    b.add_argument("--channels", type=int, choices=[1, 3], default=None, help="1 grey or 3 RGB (default 1, or the --model's)")
    b.add_argument("--classes", type=int, default=50, help="L, the number of minority classes")
    b.add_argument("--diffusion-steps", type=int, default=8000)
    b.add_argument("--widths", default="32,64,64", help="UNet channels per level of a trained model")
    b.add_argument("--clf-steps", type=int, default=6000)
    b.add_argument("--clf-base-channels", type=int, default=16)
    b.add_argument("--score-distance", choices=list(DISTANCES), default=None,
                   help="distance of the score (default: the sweep's best with --truth, else unet-feat)")
    b.add_argument("--score-t", type=finite_float, default=None,
                   help="timestep of the score, a fraction of T or an integer step (default: the sweep's best, else "
                        "the paper's 0.9T for a cosine-schedule model, 0.6T for a linear one)")
    b.add_argument("--draws", type=int, default=20, help="noise draws per image for the score")
    b.add_argument("--truth", default=None, help="metadata.csv column of ground-truth rarity or severity: the "
                                                 "distance x timestep sweep picks the score's settings by Spearman "
                                                 "against it (t at 0.2,0.4,0.6,0.8 T linear, 0.4,0.6,0.8,0.9 T cosine)")
    b.add_argument("--sweep-n", type=int, default=600, help="images in the sweep (with --truth)")
    b.add_argument("--name", default=None, help="bundle name shown in the app (default: the --out folder's name)")
    b.add_argument("--slice-band", default="0.4,0.6", help="NIfTI volumes: axial slices from this z fraction LO,HI")
    b.add_argument("--map", choices=["umap", "pca"], default="umap", help="2-D map of the real data")
    b.add_argument("--work", default=None, help="intermediate files (default OUT.work); a rerun resumes from them")
    b.add_argument("--force", action="store_true", help="replace a different bundle already in --out")
    b.add_argument("--app-sampler", choices=list(SAMPLER_NAMES), default=None,
                   help="the sampler the app and sample --bundle start with for this bundle (default: none recorded; "
                        "the app starts on ddim, sample on each method's own; the faces model needs ddpm)")
    b.add_argument("--app-steps", type=int, default=None, help="the steps recorded with --app-sampler (app.steps)")
    b.add_argument("--workers", type=int, default=0, help="DataLoader processes that decode images in the streamed "
                                                          "passes (default 0: this process)")
    b.add_argument("--cache-mb", type=int, default=1024, help="decoded images kept in memory for training (MiB, least "
                                                              "recently used go first; the set is never held whole)")
    b.add_argument("--seed", type=seed_int, default=0)
    b.set_defaults(func=cmd_build)

    bd = sub.add_parser("build-demo", help="the whole pipeline on the MRI phantom, written as a bundle")
    bd.add_argument("--out", required=True, help="bundle folder, e.g. assets/mri-atrophy")
    bd.add_argument("--work", default=None, help="intermediate files (default OUT.work); a rerun resumes from them")
    bd.add_argument("--n", type=int, default=6000)
    bd.add_argument("--size", type=int, default=32)
    bd.add_argument("--seed", type=seed_int, default=0)
    bd.add_argument("--diffusion-steps", type=int, default=8000)
    bd.add_argument("--widths", default="32,64,64")
    bd.add_argument("--sweep-n", type=int, default=600)
    bd.add_argument("--draws", type=int, default=20, help="noise draws per image for the final score")
    bd.add_argument("--score-distance", choices=list(DISTANCES), default=None,
                    help="distance of the final score (default: the sweep's best)")
    bd.add_argument("--score-t", type=finite_float, default=None,
                    help="timestep of the final score, a fraction of T or an integer step (default: the sweep's best)")
    bd.add_argument("--classes", type=int, default=50)
    bd.add_argument("--clf-steps", type=int, default=6000)
    bd.add_argument("--clf-base-channels", type=int, default=16)
    bd.add_argument("--map", choices=["umap", "pca"], default="umap", help="2-D map of the real data")
    bd.set_defaults(func=cmd_build_demo)

    d = sub.add_parser("train-diffusion", help="train a small UNet2DModel (eps objective, EMA weights)")
    d.add_argument("--data", required=True, help="image folder (sub-folders = classes for --class-cond)")
    d.add_argument("--slice-band", default="0.4,0.6", help="NIfTI volumes: axial slices from this z fraction LO,HI")
    d.add_argument("--out", required=True, help="run folder: model.safetensors + model.json")
    d.add_argument("--size", type=int, default=32)
    d.add_argument("--channels", type=int, default=1, help="1 (grey) or 3 (RGB)")
    d.add_argument("--steps", type=int, default=2000)
    d.add_argument("--batch-size", type=int, default=32)
    d.add_argument("--lr", type=finite_float, default=2e-4)
    d.add_argument("--ema-decay", type=finite_float, default=0.999)
    d.add_argument("--schedule", choices=["linear", "cosine"], default="linear")
    d.add_argument("--T", type=int, default=1000)
    d.add_argument("--widths", default="32,64,64", help="UNet channels per level, e.g. 32,64,64")
    d.add_argument("--layers-per-block", type=int, default=1)
    d.add_argument("--no-attention", action="store_true")
    d.add_argument("--class-cond", action="store_true", help="condition on the data folder's classes")
    d.add_argument("--seed", type=seed_int, default=0)
    d.add_argument("--save-every", type=int, default=500)
    d.add_argument("--resume", action="store_true", help="continue from OUT/train_state.safetensors")
    add_stream_flags(d)
    d.add_argument("--cache-mb", type=int, default=1024, help="decoded images kept in memory (MiB, least recently "
                                                              "used dropped first)")
    d.set_defaults(func=cmd_train_diffusion)

    s = sub.add_parser("score", help="minority score (Eq. 7) of every image of a folder")
    s.add_argument("--model", default=None, help="run folder, diffusers UNet2DModel folder, or hub id")
    s.add_argument("--bundle", default=None, help="score new data as a bundle scores its own: its model, distance, "
                                                  "t, draws, seed and thresholds (class and percentile columns)")
    s.add_argument("--data", required=True, help="a folder, a datasets folder (save_to_disk), Parquet files or tar "
                                                 "shards ('shards/part-{000..099}.tar', or a glob)")
    s.add_argument("--slice-band", default="0.4,0.6", help="NIfTI volumes: axial slices from this z fraction LO,HI")
    s.add_argument("--out", required=True, help="scores.csv (a .json sidecar is written beside it)")
    s.add_argument("--distance", choices=list(DISTANCES), default=None, help="default lpips")
    s.add_argument("--t", type=finite_float, default=None, help="fraction of T in (0,1) or integer timestep; default 0.9T cosine, 0.6T linear")
    s.add_argument("--draws", type=int, default=None, help="noise draws (default 5)")
    s.add_argument("--seed", type=seed_int, default=None, help="noise seed (default 0)")
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--classes", type=int, default=None, help="also categorise into L >= 2 quantile classes")
    s.add_argument("--per-class", action="store_true", help="thresholds within each data class (B.3)")
    s.add_argument("--thresholds", default=None, help="label with the thresholds of an earlier scores.csv/.json")
    s.add_argument("--no-clip", action="store_true", help="do not clip x0_hat to [-1, 1]")
    add_stream_flags(s)
    s.add_argument("--resume", action="store_true", help="keep the chunks OUT.parts/ already holds from a run with "
                                                         "the same data and settings, score the rest")
    s.set_defaults(func=cmd_score)

    x = sub.add_parser("explain", help="where each image's minority score comes from: its rarity map (issue 27)")
    x.add_argument("--bundle", required=True, help="the bundle whose model and score settings map the images")
    x.add_argument("--data", required=True, help="a folder of images / NIfTI, a .npz of images (as sample writes) or "
                                                 "a bundle folder (its real images, with their own noise rows)")
    x.add_argument("--out", required=True, help="a new folder: maps/*.npy, overlays/*.png, scores.csv, sheet.png")
    x.add_argument("--top", type=int, default=None, help="only the K most unique images (a bundle's real data: by "
                                                        "its stored scores, mapping only those)")
    x.add_argument("--batch-size", type=int, default=32)
    x.set_defaults(func=cmd_explain)

    c = sub.add_parser("categorize", help="quantile classes for a score table (labels written back)")
    c.add_argument("--scores", required=True)
    c.add_argument("--classes", type=int, required=True)
    c.add_argument("--per-class", action="store_true")
    c.set_defaults(func=cmd_categorize)

    k = sub.add_parser("train-classifier", help="train the noise-conditioned minority classifier")
    k.add_argument("--model", required=True)
    k.add_argument("--data", required=True, help="what score read: a folder, a datasets folder, Parquet files or tar "
                                                 "shards")
    k.add_argument("--slice-band", default="0.4,0.6", help="NIfTI volumes: axial slices from this z fraction LO,HI")
    k.add_argument("--scores", required=True)
    k.add_argument("--classes", type=int, default=50, help="L, the number of ordinal minority classes")
    k.add_argument("--per-class", action="store_true", help="per data class thresholds and a class-conditioned classifier")
    k.add_argument("--steps", type=int, default=2000)
    k.add_argument("--batch-size", type=int, default=64)
    k.add_argument("--lr", type=finite_float, default=3e-4)
    k.add_argument("--weight-decay", type=finite_float, default=0.05)
    k.add_argument("--base-channels", type=int, default=16, help="classifier width (see README: guidance cost)")
    k.add_argument("--channel-mult", default="1,2,2")
    k.add_argument("--res-blocks", type=int, default=1)
    k.add_argument("--holdout", type=finite_float, default=0.1)
    k.add_argument("--eval-every", type=int, default=200)
    k.add_argument("--seed", type=seed_int, default=0)
    k.add_argument("--out", required=True)
    add_stream_flags(k)
    k.add_argument("--cache-mb", type=int, default=1024, help="decoded images kept in memory (MiB, least recently "
                                                              "used dropped first; the data itself is never loaded "
                                                              "whole)")
    k.set_defaults(func=cmd_train_classifier)

    m = sub.add_parser("sample", help="draw images, optionally with minority guidance")
    m.add_argument("--model", default=None, help="run folder, diffusers folder or hub id")
    m.add_argument("--bundle", default=None, help="a bundle folder: stands for --model B --classifier B")
    m.add_argument("--classifier", default=None)
    m.add_argument("--method", default=None, help="standard | minority | mixture | self-guided | boost-skip "
                                                  "(default: minority with --classifier, else standard)")
    m.add_argument("--minority-class", default=None, help="target class l in [0, L) (default L-1, the rarest); a "
                                                         "range A-B: each sample's l drawn uniformly from A..B "
                                                         "(seeded); or all: l drawn uniformly from 0..L-1")
    m.add_argument("--scale", type=finite_float, default=1.0, help="guidance scale w >= 0 (classifier or self-guided; 0 = standard sampler)")
    m.add_argument("--n", "--num-samples", dest="n", type=int, default=16,
                   help="number of images (write --num-samples under torchrun / accelerate launch, whose own "
                        "parsers take --n for an abbreviation of their flags)")
    m.add_argument("--steps", type=int, default=None, help="respaced sampler steps (default: the bundle manifest's "
                                                           "app.steps, else 250 ancestral, 50 DDIM, 20 for dpmpp-2m, "
                                                           "dpmpp-2m-sde and unipc, 50 euler-a; at most T)")
    m.add_argument("--sampler", default=None, help="ddpm (ancestral) | ddim: ours, ADM-exact (default ddpm, the papers' "
                                                   "and official code's sampler of every method; for standard, "
                                                   "minority and mixture the bundle manifest's app.sampler if it "
                                                   "records one) | diffusers' schedulers with guidance folded into "
                                                   "eps: dpmpp-2m | dpmpp-2m-sde | unipc | euler-a | diffusers-ddim "
                                                   "| diffusers-ddpm (not for self-guided and boost-skip)")
    m.add_argument("--precision", default="auto", help="compute precision of the backbone and of the minority "
                                                       "classifier: auto (bf16 on CUDA, fp32 elsewhere) | fp32 | "
                                                       "bf16 | fp16")
    m.add_argument("--eta", type=finite_float, default=0.0, help="DDIM noise level in [0, 1]")
    m.add_argument("--seed", type=seed_int, default=0)
    m.add_argument("--batch-size", type=int, default=64)
    m.add_argument("--class-label", type=int, default=None, help="data class c for class-conditional models (Eq. 17)")
    m.add_argument("--extra-classifier", default=None, help="a second classifier added on top (Appendix D.9)")
    m.add_argument("--extra-class", type=int, default=0)
    m.add_argument("--extra-scale", type=finite_float, default=1.0)
    m.add_argument("--p", type=finite_float, default=0.8, help="self-guided: re-noising level t' = p T, in (0, 1)")
    m.add_argument("--interval", type=int, default=5, help="self-guided: guide the steps whose respaced index (0 = last) is a multiple of k")
    m.add_argument("--sg-distance", default="auto", help="self-guided: auto (lpips-alex, the official choice, if "
                                                         "AlexNet's weights are present, else unet-feat, else l2) | "
                                                         + " | ".join(DISTANCES))
    m.add_argument("--sg-clip", action="store_true", help="self-guided: clip x0_hat to [-1, 1] inside the guidance "
                                                          "(the official sampler does not)")
    m.add_argument("--sg-count-from", choices=["last", "first"], default="last",
                   help="self-guided: guide when the respaced step index (0 = last step) is a multiple of --interval "
                        "(last, official) or every k-th step from the first (first)")
    m.add_argument("--gamma", type=finite_float, default=3.0, help="boost-skip: initial noise scale gamma > 0")
    m.add_argument("--skip", type=int, default=3, help="boost-skip: sampler steps skipped at the noisy end")
    m.add_argument("--out", required=True, help="samples.npz")
    m.set_defaults(func=cmd_sample)

    e = sub.add_parser("evaluate", help="AvgkNN, LOF, Rarity, FID, sFID, precision/recall: report.json/.md, density.png")
    e.add_argument("--real", required=True, help="a bundle, a .npz of real images, or data to stream: an image/NIfTI "
                                                 "folder, a datasets folder, Parquet files or tar shards")
    e.add_argument("--generated", required=True, nargs="+", help="one or more .npz written by sample")
    e.add_argument("--out", required=True, help="report folder")
    e.add_argument("--protocol", default="single", help="single: every metric in --features (default); paper: "
                   "density and the baseline in ResNet-50, FID/sFID/precision/recall in Inception-v3 (Section 4.1)")
    e.add_argument("--features", default=None,
                   help="--protocol single's space: resnet50-random (default, offline) | resnet50 | inception | "
                        "inception-fid | inception-random | classifier")
    e.add_argument("--density-features", default=None,
                   help="--protocol paper: the density space instead of ResNet-50 as chosen (e.g. resnet50-random "
                        "offline for colour data)")
    e.add_argument("--quality-features", default=None,
                   help="--protocol paper: the quality space instead of Inception-v3 as found (e.g. inception-random "
                        "offline)")
    e.add_argument("--baseline-top", type=finite_float, default=0.1,
                   help="quality baseline: the most unique real samples by AvgkNN, a fraction in (0, 1] "
                        "(1.0 = all real data) or a count > 1")
    e.add_argument("--classifier", default=None, help="classifier folder for --features classifier "
                                                     "(default: the bundle's)")
    e.add_argument("--image-size", type=int, default=None, help="network input size (default 224 ResNet, 299 Inception)")
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--seed", type=seed_int, default=0, help="seed of the random feature network")
    e.add_argument("--slice-band", default="0.4,0.6", help="NIfTI volumes: axial slices from this z fraction LO,HI")
    add_stream_flags(e)
    e.set_defaults(func=cmd_evaluate)

    ia = sub.add_parser("import-adm", help="an OpenAI ADM diffusion checkpoint (.pt) as a run folder")
    ia.add_argument("--checkpoint", default=None, help="the downloaded .pt (read weights-only, never unpickled)")
    ia.add_argument("--preset", default=None, help="the release it comes from; 'list' prints them all, each with "
                                                   "its --flags equivalent")
    ia.add_argument("--flags", default=None, help="instead of --preset: the MODEL_FLAGS (and DIFFUSION_FLAGS) "
                                                  "string the checkpoint's README prints, in one quoted argument")
    ia.add_argument("--codebase", choices=["guided", "improved"], default=None,
                    help="whose defaults fill the flags not given: guided-diffusion (default) or improved-diffusion")
    ia.add_argument("--out", default=None, help="a new run folder")
    ia.set_defaults(func=cmd_import_adm)
    ic = sub.add_parser("import-adm-classifier", help="an OpenAI ADM classifier (.pt), optionally with the official "
                                                      "minority head on its trunk, as a classifier folder")
    ic.add_argument("--checkpoint", default=None, help="the classifier .pt (e.g. 256x256_classifier.pt)")
    ic.add_argument("--preset", default=None, help="its release (gd-256-classifier for mc_lsun); 'list' prints "
                                                   "them, each with its --flags equivalent")
    ic.add_argument("--flags", default=None, help="instead of --preset: the CLASSIFIER_FLAGS string (guided-diffusion's "
                                                  "defaults for the rest), in one quoted argument")
    ic.add_argument("--minority-head", default=None, help="mc_lsun.pt: guide with head(trunk(x_t, t), t)")
    ic.add_argument("--thresholds", default=None, help="the minority-score class thresholds (text or JSON), kept in "
                                                       "the folder for score --bundle style labelling")
    ic.add_argument("--out", default=None, help="a new classifier folder")
    ic.set_defaults(func=cmd_import_adm_classifier)

    nb = sub.add_parser("neighbours", help="nearest real images of generated ones, near-copies (Figure 24)")
    nb.add_argument("--real", required=True, help="a bundle, a .npz of real images, or data to stream: an image/NIfTI "
                                                  "folder, a datasets folder, Parquet files or tar shards")
    nb.add_argument("--generated", required=True, nargs="+", help="one or more .npz written by sample")
    nb.add_argument("--k", type=int, default=5, help="nearest real images per generated image")
    nb.add_argument("--out", required=True, help="folder: neighbours.csv, neighbours.png, summary.json")
    nb.add_argument("--features", choices=["classifier", "resnet50-random", "pixels"], default=None,
                    help="distance space (default: the bundle's classifier, else resnet50-random)")
    nb.add_argument("--rows", type=int, default=32, help="generated images per sheet (at most 32)")
    nb.add_argument("--sheets", type=int, default=1, help="sheets per generated set")
    nb.add_argument("--image-size", type=int, default=None, help="resnet50-random input size (default 224)")
    nb.add_argument("--seed", type=seed_int, default=0, help="seed of the random feature network")
    nb.add_argument("--index", default="exact", help="exact (block search) or hnsw (faiss's approximate graph, for "
                                                     "hundreds of thousands of real images; recall in docs/RESULTS.md)")
    nb.add_argument("--slice-band", default="0.4,0.6", help="NIfTI volumes: axial slices from this z fraction LO,HI")
    add_stream_flags(nb)
    nb.set_defaults(func=cmd_neighbours)
    return p


def _one_line(e: BaseException) -> str:
    """An error's message in one line. An error raised in a DataLoader worker arrives re-raised by torch as
    "Caught X in DataLoader worker process N." followed by the worker's traceback; its last line holds the message."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    if lines[0].startswith("Caught ") and "DataLoader worker" in lines[0] and len(lines) > 1:
        last = lines[-1]
        head, sep, rest = last.partition(": ")
        return rest if sep and head.split(".")[-1] == type(e).__name__ else last
    return lines[0]


def main(argv: Optional[list] = None) -> int:
    import os

    os.environ.setdefault("TQDM_MININTERVAL", "0.5")
    try:
        args = build_parser().parse_args(argv)
        prepare_outputs(args)
        return args.func(args)
    except SystemExit as e:
        return int(e.code) if isinstance(e.code, int) else EXIT_USER_ERROR
    except (MinorityError, ValueError, OSError) as e:  # OSError: a full disk, a path that cannot be made, ...
        return _fail(_one_line(e))
    except KeyboardInterrupt:
        return _fail("interrupted")
    finally:
        close_bars()


# what each command writes: (argument, "dir" | "file"), checked before any work
OUTPUTS = {"data": (("out", "dir"),), "build-demo": (("out", "dir"), ("work", "dir")), "build": (("out", "dir"), ("work", "dir")),
           "train-diffusion": (("out", "dir"),), "score": (("out", "file"),), "categorize": (("scores", "file"),),
           "train-classifier": (("out", "dir"), ("scores", "file")), "sample": (("out", "file"),),
           "evaluate": (("out", "dir"),), "neighbours": (("out", "dir"),), "import-adm": (("out", "dir"),),
           "import-adm-classifier": (("out", "dir"),)}


def prepare_outputs(args) -> None:
    """Every output location is usable before any work (one error line naming the flag otherwise), and what
    a killed run of ours left there (temp files, uncommitted pending weights) is removed, by the main
    process only."""
    import os

    from core.nets.checkpoint import clean_stale_folders, clean_stale_temps

    if args.command in ("build", "build-demo") and args.work is None:
        args.work = f"{args.out.rstrip('/')}.work"  # the one place the default work folder is made
    outputs = [(attr, kind) for attr, kind in OUTPUTS.get(args.command, ()) if getattr(args, attr) is not None]
    for attr, kind in outputs:
        check_output(getattr(args, attr), f"--{attr}", kind)
    if os.environ.get("RANK", "0") != "0" or os.environ.get("LOCAL_RANK", "0") != "0":
        return
    for attr, kind in outputs:
        folder = getattr(args, attr) if kind == "dir" else os.path.dirname(os.path.abspath(getattr(args, attr)))
        clean_stale_temps(folder)
        if kind == "dir":  # the temp folder a killed commit_folder (import-adm, build) left beside it
            clean_stale_folders(getattr(args, attr))
