"""Command line: ``deploylab prepare|data|bench|report|serve|bundle``."""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from . import config


def _interrupt_on_ctrl_c() -> None:
    """Make Ctrl-C (SIGINT) raise KeyboardInterrupt, whatever disposition the process inherited.

    A background job of a non-interactive shell (``nohup make test &``, some CI runners) starts with
    SIGINT ignored, and Python installs its KeyboardInterrupt handler only when SIGINT is not ignored
    at start: without this, `deploylab serve` would ignore Ctrl-C there and keep TorchServe running.
    """
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _prepare(args: argparse.Namespace) -> int:
    from . import assets

    profile = config.get_profile(args.profile)
    print(config.banner(profile))
    print(f"models in {config.models_dir(profile)}; resume checkpoints in {config.RESUME_DIR / profile.models}")
    try:
        metas = assets.prepare(profile, force=args.force, only=tuple(args.only) if args.only else None)
    except KeyboardInterrupt:
        print("interrupted: the finished epochs are kept; run the same command again to continue "
              "(without --force, which starts over)", file=sys.stderr)
        return 130
    total = 0.0
    for role, meta in metas.items():
        total += meta["training_seconds"]
        print(f"{role}: {meta['arch']}, test accuracy {meta['test_accuracy']:.4f} on {meta['test_images']} images, "
              f"trained {meta['training_seconds'] / 60:.1f} min on {meta['training_device']} "
              f"({meta.get('hardware', {}).get('cpu', '?')}), stored {meta.get('storage', 'float32')}, "
              f"sha256 {meta['sha256'][:12]}")
    print(f"training time of these models together: {total / 3600:.2f} h")
    return 0


def _data(args: argparse.Namespace) -> int:
    from . import data

    ds = data.load_fashion_mnist(allow_download=not args.offline)
    print(f"Fashion-MNIST verified (sha256 {data.DATA_SHA256[:12]}), read from {ds.source}: "
          f"{len(ds.train_labels)} training and {len(ds.test_labels)} test images, cached in {data.cache_dir()}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from . import assets, bench, data

    profile = config.get_profile(args.profile)
    print(config.banner(profile))
    threads = config.set_threads(args.threads)
    variants = {role: assets.load_or_build(role, profile, build=False).model for role in ("teacher", "student")}
    results = bench.compare_latency(variants, bench.example_inputs(data.tensors("test", 64)[0]),
                                    profile=profile, threads=threads)
    print(bench.latency_table(results))
    return 0


def _report(args: argparse.Namespace) -> int:
    from . import report

    path = report.update_readme(config.get_profile(args.profile))
    print(f"updated the results table in {path}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    """Build the student's archive, serve it on 127.0.0.1 until Ctrl-C, print how to call it."""
    import json
    import shlex
    import shutil
    import tempfile
    import time
    from pathlib import Path

    from . import assets, data, deployable
    from .serving import torchserve

    profile = config.get_profile(args.profile)
    print(config.banner(profile))
    problem = torchserve.java_problem()
    if problem:
        raise RuntimeError(problem)
    onnx_path = deployable.student_onnx(profile)
    workdir = Path(tempfile.mkdtemp(prefix="deploylab-serve-"))
    store = workdir / "model-store"
    cfg = torchserve.ModelConfig(min_workers=args.workers, max_workers=args.workers)
    mar = torchserve.build_archive(onnx_path, store, args.model, cfg)
    print(f"archive: {mar} (from {onnx_path.name})")
    samples = sorted(assets.sample_images_dir().glob("*.png")) or data.write_sample_images(assets.sample_images_dir())

    def on_sigterm(signum, frame):  # `kill PID` stops as cleanly as Ctrl-C
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    server = torchserve.TorchServe(store, {args.model: mar.name}, workdir=workdir / "torchserve")
    try:
        with server:
            url = f"{server.url('inference')}/predictions/{args.model}"
            token = server.tokens()["inference"]
            print(f"inference URL: {url}", flush=True)
            print(f"key file: {server.key_file}")
            api_key = json.loads(server.key_file.read_text())["API"]["key"]
            print("try it:")
            print(f"  curl -H {shlex.quote('Authorization: Bearer ' + token)} -H 'Content-Type: image/png' "
                  f"--data-binary @{shlex.quote(str(samples[0]))} {url}")
            print("the inference key expires after 60 minutes; a new one (written to the key file) with:")
            print(f"  curl -H {shlex.quote('Authorization: Bearer ' + api_key)} "
                  f"{shlex.quote(server.url('management') + '/token?type=inference')}")
            print("serving; press Ctrl-C to stop", flush=True)
            while True:
                time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # the context manager stopped the server (and raised, keeping its logs, if any of its processes survived)
    shutil.rmtree(workdir, ignore_errors=True)
    print("stopped: no TorchServe process left", flush=True)
    return 0


def _bundle(args: argparse.Namespace) -> int:
    from . import bundle

    if args.verify:
        info = bundle.verify(args.verify)
        print(f"bundle {args.verify}: all {info['files']} files match MANIFEST.sha256 "
              f"(profile {info['profile']}, commit {info['commit'][:12]}, Python {info['python']})")
        return 0
    if not args.out:
        raise ValueError("name the bundle's folder: `deploylab bundle OUT` (or check one: `deploylab bundle --verify DIR`)")
    bundle.build(args.out, args.profile, requirements=args.requirements or bundle.LOCK, archive=args.archive, exclude=args.exclude)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="deploylab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="build the dataset cache, sample images, teacher and student")
    p.add_argument("--profile", help="smoke, workshop or full (default: $DEPLOYLAB_PROFILE or workshop)")
    p.add_argument("--force", action="store_true",
                   help="retrain from scratch (discarding resume checkpoints); a model is replaced only once its successor is saved")
    p.add_argument("--only", action="append", choices=["teacher", "student"], help="prepare only this model (repeatable)")
    p.set_defaults(func=_prepare)

    p = sub.add_parser("data", help="find, verify and cache Fashion-MNIST")
    p.add_argument("--offline", action="store_true", help="do not try torchvision's download")
    p.set_defaults(func=_data)

    p = sub.add_parser("bench", help="latency of the prepared teacher and student")
    p.add_argument("--profile")
    p.add_argument("--threads", type=int, default=config.BENCH_THREADS)
    p.set_defaults(func=_bench)

    p = sub.add_parser("report", help="regenerate the README's results table from results/<profile>")
    p.add_argument("--profile", default="full")
    p.set_defaults(func=_report)

    p = sub.add_parser("serve", help="serve the student with TorchServe on 127.0.0.1 until Ctrl-C")
    p.add_argument("--profile")
    p.add_argument("--model", default="student", help="the model's name in the URL (default: student)")
    p.add_argument("--workers", type=int, default=1, help="worker processes (default: 1)")
    p.set_defaults(func=_serve)

    p = sub.add_parser("bundle", help="an offline bundle for a workshop (wheels, data, artefacts, source), or --verify one")
    p.add_argument("out", nargs="?", help="a new folder for the bundle")
    p.add_argument("--profile", help="whose artefacts go in (default: $DEPLOYLAB_PROFILE or workshop)")
    p.add_argument("--requirements", default=None, help="requirements to gather wheels for (default: requirements/lock.txt)")
    p.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                   help="leave out artefacts matching GLOB (relative to data/artefacts/<profile>); repeatable")
    p.add_argument("--archive", action="store_true", help="also pack the folder into OUT.tar")
    p.add_argument("--verify", metavar="DIR", help="check the bundle in DIR against its manifest, then exit")
    p.set_defaults(func=_bundle)

    args = parser.parse_args(argv)
    _interrupt_on_ctrl_c()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return args.func(args)
    except (config.ProfileError, RuntimeError, ValueError, FileNotFoundError) as e:  # CheckpointError, ResumeError too
        print(f"deploylab {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
