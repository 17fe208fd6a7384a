"""The ``winnow`` command: one CLI in front of every role.

Each subcommand imports its role lazily, inside the command, so ``winnow serve``
and ``winnow label-app`` never load torch, scikit-learn, OpenCV or matplotlib,
and run in a venv that has only their role's extra installed
(``pip install 'winnow-stream[scorer]'``). A command whose extra is missing says
which one to install instead of failing on an import.
"""

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING, Any

from infra.allocator import tune_allocator, tune_for_training

if TYPE_CHECKING:
    from pydantic import ValidationError

    from service.config import Settings

# The modules that show a role's extra is installed: checked before its command imports them.
EXTRA_MODULES: dict[str, tuple[str, ...]] = {
    "scorer": ("onnxruntime", "onnx", "fastapi", "uvicorn", "PIL"),
    "label-app": ("fastapi", "uvicorn", "jinja2", "httpx"),
    "trainer": ("torch", "torchvision", "onnx", "onnxscript", "onnxruntime", "PIL"),
    "produce": ("cv2",),
    "bench": ("torch", "torchvision", "onnxruntime", "sklearn", "matplotlib"),
}
_OWN_PACKAGES = frozenset({"infra", "schemas", "service", "trainer", "winnow"})


def missing_modules(extra: str | None) -> list[str]:
    """The modules of ``extra`` that cannot be imported here (none for the base install)."""
    if extra is None:
        return []
    return [name for name in EXTRA_MODULES[extra] if find_spec(name) is None]


def needs_extra(command: str, extra: str, missing: Sequence[str]) -> str:
    """What to tell someone who runs ``command`` without its role's extra."""
    return (
        f"{command} needs the {extra} extra: pip install 'winnow-stream[{extra}]' "
        f"(missing: {', '.join(missing)})"
    )


def _given(args: argparse.Namespace, *names: str) -> dict[str, Any]:
    """The options among ``names`` that were given on the command line."""
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def _broker(args: argparse.Namespace) -> int:
    from infra.kafka.broker import run_broker_forever

    return run_broker_forever(args.port)


def _worker_count(text: str) -> int:
    try:
        count = int(text)
    except ValueError:
        count = 0
    if count < 1:
        raise argparse.ArgumentTypeError(
            f"expected a whole number of processes, 1 or more, not {text!r}"
        )
    return count


def _serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from service.config import Settings
    from service.http.serve import serve

    try:
        settings = Settings()
    except ValidationError as error:
        print(f"winnow serve: {_invalid(error)}", file=sys.stderr)
        return 2
    update: dict[str, Any] = _given(args, "device", "workers")
    if args.model is not None:
        update["scorer"] = settings.scorer.model_copy(update={"model_path": args.model})
    if http := _given(args, "host", "port"):
        update["http"] = settings.http.model_copy(update=http)
    settings = settings.model_copy(update=update)
    if settings.scorer.model_path is None and not settings.scorer.follow_releases:
        print(
            "winnow serve: no model; pass --model PATH.onnx (make one with `winnow model init`) "
            "or follow the releases of `winnow train` (WINNOW_SCORER_FOLLOW_RELEASES=true)",
            file=sys.stderr,
        )
        return 2
    from service.errors import ConfigError
    from service.http.tokens import check_tokens

    try:
        check_tokens(settings)
        _check_decoder(settings)
    except ConfigError as error:
        print(f"winnow serve: {error}", file=sys.stderr)
        return 2
    if args.worker_socket is not None:  # one of the processes of --workers N
        from service.workers.worker import run_worker

        return run_worker(settings, args.worker_socket, args.worker_index)
    if settings.workers > 1:
        from service.workers.serve import serve_workers

        return serve_workers(settings, verbose=args.verbose)
    return serve(settings)


def _check_decoder(settings: "Settings") -> None:
    """Refuses a DALI decoder that would be used where DALI is not installed (``dali`` on a
    node whose model runs on the CPU falls back to the CPU decoder and needs no DALI).

    Raises:
        ConfigError: the decoder needs DALI and it cannot be imported.
    """
    from service.errors import ConfigError
    from service.model.inference import CPU, CUDA, cuda_usable
    from service.pipeline.dali_decode import dali_available, dali_device

    decoder = settings.scorer.decoder
    provider = CUDA if settings.device != "cpu" and cuda_usable()[0] else CPU
    if dali_device(decoder, provider) is None:
        return
    usable, why = dali_available()
    if not usable:
        raise ConfigError(f"WINNOW_SCORER_DECODER={decoder}: {why}")


def _invalid(error: "ValidationError") -> str:
    """A settings error in a line per field, named as its environment variable is."""
    prefix = error.title.removesuffix("Settings").upper()
    fields = "; ".join(
        f"WINNOW_{prefix + '_' if prefix else ''}{'_'.join(map(str, e['loc'])).upper()}: "
        f"{e['msg']} (got {e['input']!r})"
        for e in error.errors()
    )
    return f"invalid settings: {fields}"


def _label_app(args: argparse.Namespace) -> int:
    from infra.kafka.settings import KafkaSettings
    from service.config import LabelAppSettings
    from service.errors import ConfigError
    from service.labeling.app import create_label_app
    from service.labeling.serve import serve_app

    settings = LabelAppSettings(**_given(args, "host", "port"))
    kafka = KafkaSettings()
    try:
        create_label_app(kafka, settings)  # fails early on missing tokens
    except ConfigError as error:
        print(f"winnow label-app: {error}", file=sys.stderr)
        return 2
    return serve_app(
        kafka,
        lambda k, on_failure: create_label_app(k, settings, on_failure=on_failure),
        settings.host,
        settings.port,
    )


def _label_studio_bridge(args: argparse.Namespace) -> int:
    from infra.kafka.settings import KafkaSettings
    from service.labeling.label_studio import LabelStudioSettings, create_bridge_app
    from service.labeling.serve import serve_app

    settings = LabelStudioSettings(**_given(args, "url", "project_id", "host", "port"))
    kafka = KafkaSettings()
    try:
        create_bridge_app(kafka, settings)
    except ValueError as error:
        print(f"winnow label-studio-bridge: {error}", file=sys.stderr)
        return 2
    return serve_app(
        kafka, lambda k, _on_failure: create_bridge_app(k, settings), settings.host, settings.port
    )


def _model_init(args: argparse.Namespace) -> int:
    from trainer.arch_defaults import default_arch, default_pretrained
    from trainer.errors import ModelBuildError, ModelExportError
    from trainer.model_init import init_model

    classes = [c.strip() for c in args.classes.split(",") if c.strip()]
    if len(classes) < 2:
        print(
            "winnow model init: --classes needs at least two names, e.g. cat,dog", file=sys.stderr
        )
        return 2
    arch = args.arch or default_arch(args.input_size)
    pretrained = args.pretrained
    if pretrained is None:
        pretrained = default_pretrained(arch, has_weights=args.weights is not None)
    if pretrained and args.weights is not None:
        print("winnow model init: give --pretrained or --weights, not both", file=sys.stderr)
        return 2
    try:
        spec = init_model(
            classes=classes,
            input_size=args.input_size,
            arch=arch,
            out=args.out,
            channels=args.channels,
            weights=args.weights,
            seed=args.seed,
            pretrained=pretrained,
            precision=args.precision,
        )
    except (ModelBuildError, ModelExportError) as error:
        print(f"winnow model init: {error}", file=sys.stderr)
        return 2
    origin = "ImageNet-pretrained" if pretrained else "local weights" if args.weights else "random"
    print(
        f"wrote {args.out}: {spec.arch} ({origin}), {len(spec.classes)} classes, input "
        f"{spec.channels}x{spec.input_size[0]}x{spec.input_size[1]}, {spec.precision}, "
        f"version {spec.version}"
    )
    return 0


def _train(args: argparse.Namespace) -> int:
    from trainer.config import TrainerSettings
    from trainer.main import run_trainer

    tune_for_training()  # torch's step-sized arrays from the heap; rounds trim it

    overrides = _given(
        args, "arch", "pretrained", "input_size", "channels", "data_dir", "device", "metrics_port"
    )
    if args.classes:
        overrides["classes"] = [c.strip() for c in args.classes.split(",") if c.strip()]
    return run_trainer(TrainerSettings(**overrides))


def _demo(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from winnow.demo import run_demo
    from winnow.demo.runner import policy_settings

    try:  # a bad --policy, --budget or WINNOW_POLICY_* named before anything starts
        policy_settings(args)
    except ValidationError as error:
        print(f"winnow demo: {_invalid(error)}", file=sys.stderr)
        return 2
    return run_demo(args)


def _produce(args: argparse.Namespace) -> int:
    from winnow.produce import run_produce

    return run_produce(args)


def _bench_throughput(args: argparse.Namespace) -> int:
    from winnow.bench.throughput import run_throughput_bench

    return run_throughput_bench(args)


def _counts(text: str) -> tuple[int, ...]:
    """Comma-separated positive whole numbers, e.g. ``1,4,8``."""
    try:
        counts = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 1,4,8, not {text!r}") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"expected positive numbers like 1,4,8, not {text!r}")
    return counts


def _size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WxH, e.g. 640x480, not {text!r}") from None
    if width <= 0 or height <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive WxH, not {text!r}")
    return width, height


def _bench_label_efficiency(args: argparse.Namespace) -> int:
    from winnow.bench.label_efficiency import run_label_efficiency_bench

    return run_label_efficiency_bench(args)


def _bench_decision(args: argparse.Namespace) -> int:
    from winnow.bench.decision import run_decision_bench

    return run_decision_bench(args)


def _bench_drift(args: argparse.Namespace) -> int:
    from winnow.bench.drift import run_drift_bench_command

    return run_drift_bench_command(args)


def _env_pair(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.startswith("WINNOW_"):
        raise argparse.ArgumentTypeError(f"expected WINNOW_NAME=VALUE, not {text!r}")
    return name, value


def _bench_soak(args: argparse.Namespace) -> int:
    if missing := missing_modules("label-app"):  # the soak runs the label app too
        print(needs_extra(args.command_name, "label-app", missing), file=sys.stderr)
        return 2
    from winnow.bench.soak import run_soak_command

    return run_soak_command(args)


_ARCHS = (
    "small-cnn",
    "resnet18",
    "mobilenet_v3_small",
    "mobilenet_v3_large",
    "efficientnet_lite0",
)
_ARCH_DEFAULT = (
    "default: efficientnet_lite0 (ImageNet-pretrained) for an input size of 64 and up, "
    "small-cnn below"
)


def _command(
    p: argparse.ArgumentParser, func: Callable[[argparse.Namespace], int], extra: str | None
) -> None:
    """Makes ``p`` run ``func``, which needs the ``extra`` of its role (None: the base install)."""
    p.set_defaults(func=func, extra=extra, command_name=p.prog)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="winnow", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "broker", help="run the embedded Kafka-compatible broker (Tansu, memory only)"
    )
    p.add_argument("--port", type=int, default=9092)
    _command(p, _broker, None)

    p = sub.add_parser("serve", help="run the scorer and its HTTP API")
    p.add_argument("--model", type=Path, help="ONNX model with winnow metadata")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--host", help="HTTP host (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="HTTP port (default 8000)")
    p.add_argument(
        "--workers",
        type=_worker_count,
        help="scorer processes in this machine's share of the consumer group, behind one "
        "HTTP endpoint (default 1: a single process; WINNOW_WORKERS)",
    )
    p.add_argument("--worker-socket", type=Path, help=argparse.SUPPRESS)  # set by --workers
    p.add_argument("--worker-index", type=int, default=0, help=argparse.SUPPRESS)
    _command(p, _serve, "scorer")

    p = sub.add_parser("label-app", help="the labeling team's web app")
    p.add_argument("--host", help="HTTP host (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="HTTP port (default 8100)")
    _command(p, _label_app, "label-app")

    p = sub.add_parser(
        "label-studio-bridge", help="label requests into Label Studio, its annotations back"
    )
    p.add_argument("--url", help="Label Studio's base URL")
    p.add_argument("--project-id", type=int, help="the Label Studio project")
    p.add_argument("--host", help="webhook HTTP host (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="webhook HTTP port (default 8200)")
    _command(p, _label_studio_bridge, "label-app")

    model = sub.add_parser("model", help="model files").add_subparsers(
        dest="model_cmd", required=True
    )
    p = model.add_parser("init", help="write an initial ONNX model with winnow metadata")
    p.add_argument("--classes", required=True, help="comma-separated class names")
    p.add_argument("--input-size", type=int, default=224, help="input height and width")
    p.add_argument("--arch", choices=list(_ARCHS), help=_ARCH_DEFAULT)
    p.add_argument("--channels", type=int, choices=[1, 3], default=3)
    p.add_argument(
        "--pretrained",
        action=argparse.BooleanOptionalAction,
        help="load the packaged ImageNet weights (efficientnet_lite0 only; its default)",
    )
    p.add_argument("--weights", type=Path, help="a local torchvision checkpoint (pretrained)")
    p.add_argument(
        "--precision",
        choices=["fp32", "fp16"],
        default="fp32",
        help="arithmetic inside the graph; fp16 halves the file and suits GPUs (input and "
        "outputs stay float32)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    _command(p, _model_init, "trainer")

    p = sub.add_parser("train", help="fine-tune on labels and publish model releases")
    p.add_argument("--classes", help="comma-separated class names (first start only)")
    p.add_argument(
        "--arch", choices=list(_ARCHS), help=f"architecture of the first model ({_ARCH_DEFAULT})"
    )
    p.add_argument(
        "--pretrained",
        action=argparse.BooleanOptionalAction,
        help="first model from the packaged ImageNet weights (default for efficientnet_lite0)",
    )
    p.add_argument("--input-size", type=int, help="input height and width of the first model")
    p.add_argument("--channels", type=int, choices=[1, 3])
    p.add_argument("--data-dir", type=Path, help="sample store and checkpoints")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--metrics-port", type=int)
    _command(p, _train, "trainer")

    p = sub.add_parser("demo", help="the whole loop on one machine, with a summary and plot")
    p.add_argument(
        "--dataset",
        default="digits",
        help="digits, or a MedMNIST-layout .npz such as ../shared/data/pneumoniamnist.npz",
    )
    p.add_argument("--max-frames", type=int, default=None, help="stream at most this many frames")
    p.add_argument("--rate", type=float, default=100.0, help="frames per second (0: flat out)")
    p.add_argument("--budget", type=float, default=0.1, help="fraction of frames to label")
    p.add_argument(
        "--policy",
        default=None,
        help="the query strategy (default the scorer's own: WINNOW_POLICY_NAME, or quantile)",
    )
    p.add_argument("--label-delay", type=float, default=0.05, help="seconds per answer")
    p.add_argument("--label-rate", type=float, default=20.0, help="answers per second, at most")
    p.add_argument("--round-labels", type=int, default=20, help="new labels that start a round")
    p.add_argument("--round-seconds", type=float, default=10.0, help="or seconds since the last")
    p.add_argument("--input-size", type=int, default=None, help="model input (16 digits, 28 npz)")
    p.add_argument("--http-port", type=int, default=8000, help="HTTP API port (0: any free)")
    p.add_argument("--plot", type=Path, default=Path("winnow-demo.png"))
    p.add_argument("--json", type=Path, help="write a JSON summary here")
    p.add_argument(
        "--inject-shift",
        choices=["brightness", "contrast", "blur", "noise", "rotation"],
        help="shift the second half of the stream, so that drift shows",
    )
    _command(p, _demo, "bench")

    p = sub.add_parser(
        "produce", help="stream a directory, video file or camera into the frames topic"
    )
    p.add_argument("source", help="a directory of images, a video file, /dev/videoN or a URL")
    p.add_argument("--source-id", help="the record key (default: the source's name)")
    p.add_argument("--bootstrap", help="Kafka host:port (default $WINNOW_KAFKA_BOOTSTRAP)")
    p.add_argument("--topic", help="default <WINNOW_KAFKA_TOPIC_PREFIX>frames")
    p.add_argument("--fps", type=float, help="video: sample rate; dir: pace; camera: at most")
    p.add_argument("--fast", action="store_true", help="no pacing: as fast as possible")
    p.add_argument("--loop", action="store_true", help="start over at the end (dir, video)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality (default 90)")
    p.add_argument("--size", type=_size, help="resize frames to WxH, e.g. 640x480")
    p.add_argument("--format", choices=["jpeg", "png"], default="jpeg", dest="image_format")
    p.add_argument("--max-frames", type=int, help="stop after this many frames")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.add_argument("--connect-timeout", type=float, default=10.0, help="seconds (default 10)")
    _command(p, _produce, "produce")

    bench = sub.add_parser("bench", help="benchmarks (JSON out)").add_subparsers(
        dest="bench_cmd", required=True
    )
    p = bench.add_parser("throughput", help="scorer vs bare ONNX Runtime vs a naive loop")
    p.add_argument("--json", type=Path, default=Path("throughput.json"))
    p.add_argument("--frames", type=int, default=None, help="frames per case")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--cases", default="camera,digits", help="comma-separated: camera,digits")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument(
        "--batch-sizes",
        type=_counts,
        default=(16, 64),
        help="comma-separated: the scorer measured again at each (default 16,64)",
    )
    p.add_argument(
        "--workers",
        type=_counts,
        default=(1,),
        help="comma-separated scorer process counts, e.g. 1,4,8 (default 1); the first is "
        "the main run's",
    )
    p.add_argument(
        "--frame-size",
        type=_size,
        default=None,
        help="the camera case's frames as WxH, e.g. 1920x1080 (default: crops of 640x427)",
    )
    p.add_argument("--no-naive", action="store_true", help="skip the one-record-at-a-time loop")
    p.add_argument(
        "--precision",
        choices=["fp32", "fp16"],
        default="fp32",
        help="arithmetic inside the models' graphs (as WINNOW_TRAINER_PRECISION)",
    )
    p.add_argument(
        "--decoder",
        choices=["cpu", "dali", "dali-cpu"],
        default="cpu",
        help="the scorer's frame decoder (as WINNOW_SCORER_DECODER): dali decodes JPEG batches "
        "on the GPU with NVIDIA DALI where the model runs on CUDA",
    )
    _command(p, _bench_throughput, "bench")

    p = bench.add_parser("drift", help="drift detectors vs River baselines at one ERT")
    p.add_argument("--dataset", default="digits", help="digits, or a MedMNIST-layout .npz")
    p.add_argument("--json", type=Path, default=Path("drift.json"))
    p.add_argument("--ert", type=int, default=1000, help="expected frames between false alarms")
    p.add_argument("--runs", type=int, default=100, help="runs per case")
    p.add_argument("--embedding-window", type=int, default=64)
    p.add_argument("--class-window", type=int, default=200)
    p.add_argument(
        "--shifts",
        default="brightness,contrast,blur,noise,rotation,class_mix,new_camera",
        help="comma-separated",
    )
    p.add_argument("--no-baselines", action="store_true", help="skip River's detectors")
    p.add_argument(
        "--references", type=int, default=20, help="random reference draws the runs spread over"
    )
    p.add_argument(
        "--reference-frames",
        type=int,
        default=1000,
        help="frames per reference (at most half the held-out frames)",
    )
    p.add_argument("--seed", type=int, default=0)
    _command(p, _bench_drift, "bench")
    p = bench.add_parser(
        "label-efficiency", help="labels to reach 95% of full accuracy, per query strategy"
    )
    from winnow.bench.label_efficiency import add_arguments

    add_arguments(p)
    _command(p, _bench_label_efficiency, "bench")

    p = bench.add_parser("decision", help="CPU time of the query decision a frame, per strategy")
    from winnow.bench.decision import add_arguments as add_decision_arguments

    add_decision_arguments(p)
    _command(p, _bench_decision, "bench")

    p = bench.add_parser(
        "soak", help="scorer, trainer and label app under steady load: RSS, fds, tasks, lag"
    )
    p.add_argument("--minutes", type=float, default=60.0, help="steady load (0.5: 30 s)")
    p.add_argument("--json", type=Path, default=Path("soak.json"))
    p.add_argument("--rate", type=float, help="frames per second (default: measure capacity)")
    p.add_argument("--load-fraction", type=float, default=0.8, help="of the measured capacity")
    p.add_argument("--capacity-seconds", type=float, default=30.0)
    p.add_argument("--sample-seconds", type=float, default=10.0)
    p.add_argument("--dataset", default="digits", help="digits, or a MedMNIST-layout .npz")
    p.add_argument(
        "--shift",
        choices=["brightness", "contrast", "blur", "noise", "rotation", "none"],
        default="brightness",
        help="shift of the frames from half time on",
    )
    p.add_argument("--label-rate", type=float, default=2.0, help="answers per second, at most")
    p.add_argument("--round-labels", type=int, default=20, help="new labels that start a round")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument(
        "--role-env",
        type=_env_pair,
        action="append",
        default=[],
        metavar="WINNOW_X=VALUE",
        help="a setting for every role, e.g. WINNOW_POLICY_BACKPRESSURE_WAITING=0 (repeatable); "
        "the soak's own default: WINNOW_TRAINER_TORCH_THREADS=1",
    )
    _command(p, _bench_soak, "bench")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    tune_allocator()  # before any thread starts: long-running roles return what they free
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    func: Callable[[argparse.Namespace], int] = args.func
    extra: str | None = args.extra
    if missing := missing_modules(extra):
        print(needs_extra(args.command_name, extra or "", missing), file=sys.stderr)
        return 2
    try:
        return func(args)
    except KeyboardInterrupt:
        return 130
    except ModuleNotFoundError as error:
        # A dependency of the role that the check above does not list.
        root = (error.name or "").partition(".")[0]
        if extra is None or not root or root in _OWN_PACKAGES:
            raise
        print(needs_extra(args.command_name, extra, [root]), file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
