"""Command line: ``deploylab prepare|data|bench|report``."""

from __future__ import annotations

import argparse
import logging
import sys

from . import config


def _prepare(args: argparse.Namespace) -> int:
    from . import assets

    profile = config.get_profile(args.profile)
    print(config.banner(profile))
    metas = assets.prepare(profile, force=args.force)
    for role, meta in metas.items():
        print(f"{role}: {meta['arch']}, test accuracy {meta['test_accuracy']:.4f} on {meta['test_images']} images, "
              f"trained {meta['training_seconds']} s on {meta['training_device']}, sha256 {meta['sha256'][:12]}")
    print(f"artefacts in {config.artefacts_dir(profile)}")
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="deploylab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="build the dataset cache, sample images, teacher and student")
    p.add_argument("--profile", help="smoke, workshop or full (default: $DEPLOYLAB_PROFILE or workshop)")
    p.add_argument("--force", action="store_true", help="retrain and replace existing checkpoints")
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

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return args.func(args)
    except (config.ProfileError, RuntimeError, ValueError) as e:
        print(f"deploylab {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
