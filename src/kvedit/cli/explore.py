"""`kvedit explore`: the memory explorer, a local web page over one model."""

from __future__ import annotations

import argparse
import ipaddress
import socket
from collections.abc import Callable
from pathlib import Path

from .common import add_model_args, load, positive_int

LOOPBACK_NAMES = ("localhost",)


def port_number(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number 0..65535, got {text!r}")
    return port


def register(sub: argparse._SubParsersAction) -> dict[str, Callable[[argparse.Namespace], int]]:
    e = sub.add_parser(
        "explore",
        help="the memory explorer: a local web page to look inside FFN memories, intervene, edit and revert",
        description="Serve the memory explorer for one model on http://HOST:PORT (loopback only "
        "unless --host says otherwise): prompt view, memory view, interventions, edits.",
    )
    e.add_argument(
        "--mined",
        type=Path,
        default=None,
        help="a folder with mined trigger examples (`kvedit analyze triggers --out DIR`) to show per memory",
    )
    e.add_argument(
        "--corpus",
        default="self",
        help="what 'Mine this layer' reads: a text file, a folder of .txt files, hf:<dataset>, or self "
        "(text the model samples itself; the default)",
    )
    e.add_argument(
        "--mine-tokens",
        type=positive_int,
        default=20_000,
        help="corpus tokens mined per layer on the fly (default 20000; the page can change it)",
    )
    e.add_argument(
        "--mine-rank",
        choices=["value", "abs"],
        default="value",
        help="rank mined prefixes by the signed coefficient (default) or by |coefficient| (gated FFNs "
        "also write strongly with negative coefficients)",
    )
    e.add_argument(
        "--stats",
        default=None,
        dest="stats_source",
        help="rome/memit/pmet: corpus for key statistics (default: the preset's, 'self')",
    )
    e.add_argument(
        "--stats-tokens",
        type=positive_int,
        default=None,
        help="rome/memit/pmet: tokens of the statistics corpus (default: the preset's)",
    )
    e.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 lets anyone who can "
        "reach it look at and edit the model)",
    )
    e.add_argument("--port", type=port_number, default=8000, help="port (default 8000; 0 picks a free one)")
    add_model_args(e)
    return {"explore": cmd_explore}


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or a clear error if the address is taken or not this machine's."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise ValueError(
            f"cannot listen on {host}:{port} ({err.strerror}); pass another --port (or --port 0 for a free one)"
        ) from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def cmd_explore(args: argparse.Namespace) -> int:
    import uvicorn

    from ..analysis.triggers import TRIGGERS_FILE, TriggerSet
    from ..explore import ExploreSession, ExploreSettings, create_app
    from ..explore.security import loopback_origins

    if args.mined is not None and not (args.mined / TRIGGERS_FILE).is_file():
        raise FileNotFoundError(
            f"--mined {args.mined} holds no mined triggers ({TRIGGERS_FILE}); run `kvedit analyze "
            f"triggers --out {args.mined}` first, or leave --mined out and mine layers in the page"
        )
    settings = ExploreSettings(
        corpus=args.corpus,
        mine_tokens=args.mine_tokens,
        mine_rank=args.mine_rank,
        stats_source=args.stats_source,
        stats_tokens=args.stats_tokens,
    )
    sock = bind_socket(args.host, args.port)  # before loading: a taken port fails at once
    triggers = TriggerSet.load(args.mined) if args.mined is not None else None
    lm = load(args)
    session = ExploreSession(lm, settings, triggers, str(args.mined) if args.mined else "")
    loopback = is_loopback(args.host)
    hosts = None if not loopback else ["127.0.0.1", "localhost", "[::1]", "::1"]
    host, port = sock.getsockname()[:2]
    # changes are accepted only from this server's own page: its origins (on loopback, the bound port's) + token
    app = create_app(session, allowed_hosts=hosts, origins=loopback_origins(port) if loopback else None)
    shown = f"[{host}]" if ":" in host else host
    print(f"kvedit explore: {lm.name} ({lm.num_layers} layers) at http://{shown}:{port}/")
    if loopback:
        print(
            "listening on the loopback interface only: reachable from this machine, not from the network "
            "(--host 0.0.0.0 to change that)"
        )
    else:
        print(f"listening on {host}: anyone who can reach this address can look at and edit the model")
    if triggers is not None:
        print(f"trigger examples of layers {triggers.layers[0]}–{triggers.layers[-1]} from {args.mined}")
    print(
        "Ctrl-C stops the server (edits live in memory only; download a patch to keep one); a running job is "
        "cancelled first and its weights restored"
    )
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    try:
        server.run(sockets=[sock])  # Ctrl-C: uvicorn shuts down (the app's lifespan cancels the job), then re-raises
    except KeyboardInterrupt:
        print("kvedit explore: stopped")
    finally:
        session.close()  # cancels the running job and waits for its thread: no torch thread outlives the server
        sock.close()
        stopped = session.jobs.stopped
        if stopped is not None:
            print(f"job {stopped.id} ({stopped.title}) {stopped.state}: {stopped.phase}")
    return 0
