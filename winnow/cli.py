"""The ``winnow`` command: one CLI in front of every role.

Each subcommand imports its role lazily, so ``winnow broker`` does not load
torch and ``winnow serve`` does not load the trainer.
"""

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path


def _broker(args: argparse.Namespace) -> int:
    from service.kafka.broker import run_broker_forever

    return run_broker_forever(args.port)


def _serve(args: argparse.Namespace) -> int:
    from service.config import Settings
    from service.serve import serve

    settings = Settings()
    if args.model is not None:
        settings.scorer.model_path = args.model
    if args.device is not None:
        settings.device = args.device
    if args.host is not None:
        settings.http.host = args.host
    if args.port is not None:
        settings.http.port = args.port
    if settings.scorer.model_path is None and not settings.scorer.follow_releases:
        print(
            "winnow serve: no model; pass --model PATH.onnx (make one with `winnow model init`) "
            "or follow the releases of `winnow train` (WINNOW_SCORER_FOLLOW_RELEASES=true)",
            file=sys.stderr,
        )
        return 2
    return serve(settings)


def _model_init(args: argparse.Namespace) -> int:
    from trainer.model_init import init_model

    classes = [c.strip() for c in args.classes.split(",") if c.strip()]
    if len(classes) < 2:
        print(
            "winnow model init: --classes needs at least two names, e.g. cat,dog", file=sys.stderr
        )
        return 2
    spec = init_model(
        classes=classes,
        input_size=args.input_size,
        arch=args.arch,
        out=args.out,
        channels=args.channels,
        weights=args.weights,
        seed=args.seed,
    )
    print(
        f"wrote {args.out}: {spec.arch}, {len(spec.classes)} classes, input "
        f"{spec.channels}x{spec.input_size[0]}x{spec.input_size[1]}, version {spec.version}"
    )
    return 0


def _train(args: argparse.Namespace) -> int:
    from trainer.config import TrainerSettings
    from trainer.main import run_trainer

    settings = TrainerSettings()
    if args.classes:
        settings.classes = [c.strip() for c in args.classes.split(",") if c.strip()]
    for name in ("arch", "input_size", "channels", "data_dir", "device", "metrics_port"):
        if getattr(args, name) is not None:
            setattr(settings, name, getattr(args, name))
    return run_trainer(settings)


def _demo(args: argparse.Namespace) -> int:
    from winnow.demo import run_demo

    return run_demo(args)


def _bench_throughput(args: argparse.Namespace) -> int:
    from winnow.bench.throughput import run_throughput_bench

    return run_throughput_bench(args)


_ARCHS = ("small-cnn", "resnet18", "mobilenet_v3_small", "mobilenet_v3_large")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="winnow", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "broker", help="run the embedded Kafka-compatible broker (Tansu, memory only)"
    )
    p.add_argument("--port", type=int, default=9092)
    p.set_defaults(func=_broker)

    p = sub.add_parser("serve", help="run the scorer and its HTTP API")
    p.add_argument("--model", type=Path, help="ONNX model with winnow metadata")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--host", help="HTTP host (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="HTTP port (default 8000)")
    p.set_defaults(func=_serve)

    model = sub.add_parser("model", help="model files").add_subparsers(
        dest="model_cmd", required=True
    )
    p = model.add_parser("init", help="write an initial ONNX model with winnow metadata")
    p.add_argument("--classes", required=True, help="comma-separated class names")
    p.add_argument("--input-size", type=int, default=224, help="input height and width")
    p.add_argument(
        "--arch",
        default="resnet18",
        choices=list(_ARCHS),
    )
    p.add_argument("--channels", type=int, choices=[1, 3], default=3)
    p.add_argument("--weights", type=Path, help="a local torchvision checkpoint (pretrained)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=_model_init)

    p = sub.add_parser("train", help="fine-tune on labels and publish model releases")
    p.add_argument("--classes", help="comma-separated class names (first start only)")
    p.add_argument("--arch", choices=list(_ARCHS), help="architecture of the first model")
    p.add_argument("--input-size", type=int, help="input height and width of the first model")
    p.add_argument("--channels", type=int, choices=[1, 3])
    p.add_argument("--data-dir", type=Path, help="sample store and checkpoints")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--metrics-port", type=int)
    p.set_defaults(func=_train)

    p = sub.add_parser("demo", help="the whole loop on one machine, with a summary and plot")
    p.add_argument(
        "--dataset",
        default="digits",
        help="digits, or a MedMNIST-layout .npz such as ../shared/data/pneumoniamnist.npz",
    )
    p.add_argument("--max-frames", type=int, default=None, help="stream at most this many frames")
    p.add_argument("--rate", type=float, default=100.0, help="frames per second (0: flat out)")
    p.add_argument("--budget", type=float, default=0.1, help="fraction of frames to label")
    p.add_argument("--policy", default="variable")
    p.add_argument("--label-delay", type=float, default=0.05, help="seconds per answer")
    p.add_argument("--label-rate", type=float, default=20.0, help="answers per second, at most")
    p.add_argument("--round-labels", type=int, default=20, help="new labels that start a round")
    p.add_argument("--round-seconds", type=float, default=10.0, help="or seconds since the last")
    p.add_argument("--input-size", type=int, default=None, help="model input (16 digits, 28 npz)")
    p.add_argument("--http-port", type=int, default=8000, help="HTTP API port (0: any free)")
    p.add_argument("--plot", type=Path, default=Path("winnow-demo.png"))
    p.add_argument("--json", type=Path, help="write a JSON summary here")
    p.set_defaults(func=_demo)

    bench = sub.add_parser("bench", help="benchmarks (JSON out)").add_subparsers(
        dest="bench_cmd", required=True
    )
    p = bench.add_parser("throughput", help="scorer vs bare ONNX Runtime vs a naive loop")
    p.add_argument("--json", type=Path, default=Path("throughput.json"))
    p.add_argument("--frames", type=int, default=None, help="frames per case")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--cases", default="camera,digits", help="comma-separated: camera,digits")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.set_defaults(func=_bench_throughput)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
