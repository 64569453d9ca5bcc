"""The ``fedpriv`` command.

``fedpriv simulate [CONFIG.yaml] [key=value ...] [--out DIR]`` checks everything
it can before training (config, data, partitions, privacy targets), prints the
plan, runs Flower's simulation engine and ends with a short summary;
``fedpriv simulate --resume RUN_DIR`` continues a run after its last complete round.

``fedpriv provision FEDERATION.yaml --out kits/`` writes the coordinator's and
each organisation's kit (CA, TLS certificate, node keys, start scripts);
``fedpriv pki inspect KIT`` checks one; ``fedpriv federation up FEDERATION.yaml
--kits DIR`` runs a whole deployment (SuperLink, SuperNodes, ``flwr run``) on
this machine. ``fedpriv audit RUN_DIR`` verifies the run's privacy ledgers and
recomputes every organisation's epsilon.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from fedpriv.kernel.errors import UserError


def _split_positionals(values: list[str]) -> tuple[str | None, list[str]]:
    """The first positional is a config file unless it looks like ``key=value``."""
    if values and "=" not in values[0]:
        return values[0], values[1:]
    return None, values


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedpriv",
        description="Federated, differentially private fine-tuning of transformer text classifiers.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    sim = commands.add_parser(
        "simulate",
        help="run a local simulation with N virtual organisations",
        description="Run Flower's simulation engine with the config (default: the packaged demo).",
    )
    sim.add_argument("args", nargs="*", metavar="[CONFIG.yaml] [key=value ...]")
    sim.add_argument("--out", help="run folder (default: runs/<timestamp>/)")
    sim.add_argument("--dry-run", action="store_true", help="check config, data and privacy plan; do not train")
    sim.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue a run that stopped (its coordinator killed or crashed) after its last complete round,"
        " with the config it started with",
    )
    sim.add_argument("--verbose", action="store_true", help="show Flower's and Ray's own logs")

    show = commands.add_parser("config", help="print the resolved config as YAML")
    show.add_argument("args", nargs="*", metavar="[CONFIG.yaml] [key=value ...]")

    prov = commands.add_parser(
        "provision",
        help="write the kits of a multi-organisation federation (CA, certificates, node keys, start scripts)",
        description="Create or update the coordinator's and every organisation's kit from FEDERATION.yaml."
        " Re-running changes nothing; keys are never regenerated.",
    )
    prov.add_argument("federation", metavar="FEDERATION.yaml")
    prov.add_argument("--out", required=True, help="folder of the kits (coordinator/ and one folder per organisation)")
    prov.add_argument("--add-org", metavar="NAME", help="enrol only this organisation (it must be in FEDERATION.yaml)")
    prov.add_argument(
        "--make-org-keys",
        action="store_true",
        help="make the private keys of organisations without a join_request here (a try-out only: whoever holds"
        " the kits can then act as those organisations)",
    )

    org = commands.add_parser("org", help="an organisation's own side: its keys, its join request, the reply")
    org_sub = org.add_subparsers(dest="org_command", required=True)
    init = org_sub.add_parser(
        "init",
        help="make this organisation's node and ledger keys here and a join request for the coordinator",
        description="Writes KIT/node.key and KIT/ledger.key (mode 0600: they never leave this machine), their"
        " public halves, and KIT/join-request.json (public keys and the organisation's name only), which you send"
        " to the coordinator; read the printed fingerprints to the coordinator over another channel. Re-running"
        " keeps existing keys.",
    )
    init.add_argument("org", metavar="ORG", help="the organisation's name in the federation file")
    init.add_argument("--kit", required=True, help="this organisation's kit folder (created if missing)")
    init.add_argument("--federation", default="", help="the federation's name (checked by the coordinator)")
    accept = org_sub.add_parser(
        "accept",
        help="take the coordinator's reply (kits/ORG/) into your kit, after checking it against your own keys",
        description="Refuses a reply that holds any private key, names keys other than your own, or brings a CA"
        " other than the one your kit already trusts. Never replaces your node.yaml: a different proposal is"
        " written to node.yaml.new.",
    )
    accept.add_argument("reply", metavar="REPLY_DIR", help="the folder the coordinator sent (its kits/ORG/)")
    accept.add_argument("--kit", required=True, help="your kit folder (where `fedpriv org init` made your keys)")

    app_cmd = commands.add_parser("app", help="the Flower app a node may run")
    app_sub = app_cmd.add_subparsers(dest="app_command", required=True)
    app_hash = app_sub.add_parser(
        "hash",
        help="print the SHA-256 of the FAB `flwr run` builds from an app folder (or of a .fab file)",
        description="What an organisation lists in node.yaml's approved_apps after reviewing the app: the same"
        " digest Flower gives the run's FAB (`flwr ls`). Without APP: this checkout's app, staged as `fedpriv"
        " federation up` ships it.",
    )
    app_hash.add_argument("app", nargs="?", metavar="APP", help="an app folder (with pyproject.toml) or a .fab file")
    app_hash.add_argument("--stage", metavar="DIR", help="also copy this checkout's app into DIR (for `flwr run DIR`)")

    pki_cmd = commands.add_parser("pki", help="inspect certificates and keys")
    pki_sub = pki_cmd.add_subparsers(dest="pki_command", required=True)
    insp = pki_sub.add_parser(
        "inspect",
        help="show a kit's certificates and keys and check them (exit 1 when a check fails, 2 when a file is unreadable)",
        description="Subjects, SANs, validity, key types and fingerprints; checks chains, validity, key pairs, key"
        " types and encodings, permissions. Exit code 0 when every check passes; 1 when one fails (expired or not"
        " yet valid, wrong CA, key mismatch, wrong key type: all are listed); 2 when the kit or a file in it cannot"
        " be read at all (missing ca.crt, a folder, empty, truncated, not PEM: one error line naming it).",
    )
    insp.add_argument("kit", metavar="KIT", help="a kit folder or one .crt file")

    fed = commands.add_parser("federation", help="run a deployment (SuperLink + SuperNodes) on this machine")
    fed_sub = fed.add_subparsers(dest="federation_command", required=True)
    up = fed_sub.add_parser(
        "up",
        help="provision the kits if missing, start one SuperLink and a SuperNode per organisation on 127.0.0.1,"
        " enrol them, run `flwr run`, stop everything",
        description="Try the deployment path on one machine: the same kits, TLS, node keys and `flwr run` as a real"
        " federation, with every process on 127.0.0.1 (free ports). Each organisation trains on the data file and"
        " privacy budget FEDERATION.yaml gives it. Existing kits are checked as `fedpriv provision` checks them"
        " before any process starts: a bad certificate or key file is one error line and exit code 2.",
    )
    up.add_argument("federation", metavar="FEDERATION.yaml")
    up.add_argument("args", nargs="*", metavar="key=value", help="run config overrides, e.g. model.name=tiny")
    up.add_argument("--kits", required=True, help="kits folder (provisioned here for a 127.0.0.1 coordinator)")
    up.add_argument("--rounds", type=int, help="training.rounds")
    up.add_argument("--config", help="a fedpriv run config YAML (default: the packaged one)")
    up.add_argument("--out", help="run folder (default: runs/<timestamp>/)")
    up.add_argument("--timeout", type=float, help="stop the run after this many seconds")
    up.add_argument("--verbose", action="store_true", help="show Flower's own log lines from the run")
    up.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue a run whose coordinator stopped, after its last complete round (with its own config)",
    )

    aud = commands.add_parser(
        "audit",
        help="verify privacy ledgers and recompute each organisation's epsilon (exit 0 ok, 1 a check failed)",
        description="Check a run's privacy ledgers without trusting the operator: the organisations' keys,"
        " signatures, hash chains, every entry's parameters, the epsilon recomputed from the recorded parameters"
        " by a second implementation (dp-accounting: RDP for every entry, PLD), every organisation's budget, and"
        " summary.json against the ledgers. Writes audit.json, audit.md and audit.html. Exit code 0 when"
        " everything holds, 1 when a check fails, 2 when the input cannot be read, 3 when the run had DP off"
        " (no privacy guarantee to audit).",
    )
    aud.add_argument(
        "paths",
        nargs="+",
        metavar="RUN_DIR_OR_LEDGERS",
        help="run folders, ledgers/ folders, or an organisation's own ledger.jsonl (its ledger.pub beside it)",
    )
    aud.add_argument(
        "--keys",
        help="the organisations' own ledger keys: a folder of <org>.pub files or of their kits (<org>/ledger.pub);"
        " without it (or their own ledger copies) the keys come from the audited folder: trust on first use",
    )
    aud.add_argument("--roster", metavar="FEDERATION.yaml", help="the provisioned organisations: each needs a ledger")
    aud.add_argument(
        "--strict", action="store_true", help="fail (exit 1) when a ledger could only be checked on trust on first use"
    )
    aud.add_argument("--out", help="where to write the audit files (default: the run folder, else the current folder)")
    aud.add_argument(
        "--no-pld",
        "--no-prv",  # fedpriv-audit/1's name
        dest="no_pld",
        action="store_true",
        help="compute PLD only where RDP leaves a claim open, not each ledger's total (faster)",
    )

    pred = commands.add_parser(
        "predict",
        help="classify text with an exported model, redacted first with the rules it was trained under",
        description="Load a run's model/ folder (merged model, tokenizer, redaction.json), redact each text with the"
        " rules the organisations applied before training, and print one JSON line per text: label, score, the"
        " redacted text the model saw and the matches replaced per kind.",
    )
    pred.add_argument("model_dir", metavar="MODEL_DIR", help="a run's model/ folder")
    pred.add_argument("texts", nargs="*", metavar="TEXT", help="texts to classify (default: one per line on stdin)")
    pred.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="tokens kept per text (default: what the model was trained with, from MODEL_DIR/fedpriv-model.json;"
        " 128 for a model exported without it)",
    )
    return parser


def _load(args: list[str]):
    from fedpriv.kernel.config import load_config

    path, overrides = _split_positionals(args)
    return load_config(path, overrides)


def cmd_config(ns: argparse.Namespace) -> int:
    import yaml

    print(yaml.safe_dump(_load(ns.args).to_dict(), sort_keys=False), end="")
    return 0


def cmd_simulate(ns: argparse.Namespace) -> int:
    resume = None
    if ns.resume:
        from fedpriv.kernel.config import config_from_dict
        from fedpriv.kernel.errors import ConfigError
        from fedpriv.server.resume import load_resume_point, resumable

        if ns.args or ns.out:
            raise ConfigError(
                "--resume RUN_DIR continues a run with the config and folder it started with: drop"
                f" {' and '.join(part for part, given in (('CONFIG/key=value', ns.args), ('--out', ns.out)) if given)}"
                " (every organisation's noise was calibrated for that run's plan)"
            )
        resume = resumable(load_resume_point(ns.resume))
        cfg = config_from_dict(resume.config)
    else:
        cfg = _load(ns.args)  # before the heavy imports below: a config mistake is reported in well under a second
    from fedpriv.data.partitioning import plan_partitions
    from fedpriv.shared_models.sources import model_source

    model_source(cfg.model.name)  # the model folder and the data files next: their mistakes too, before torch
    plan_partitions(cfg)  # (memoised for the run)
    from fedpriv.simulations.runner import run_simulation_from_config

    if ns.out:
        cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, out_dir=ns.out))
    summary = run_simulation_from_config(cfg, dry_run=ns.dry_run, verbose=ns.verbose, resume=resume)
    if summary is not None and summary.get("status") != "completed":
        return summary.get("exit_code", 1)
    return 0


def cmd_provision(ns: argparse.Namespace) -> int:
    from fedpriv.commands.provisioning.federation import load_federation
    from fedpriv.commands.provisioning.kits import provision

    outcome = provision(load_federation(ns.federation), ns.out, add_org=ns.add_org, make_org_keys=ns.make_org_keys)
    for change in outcome.changes:
        print(f"{change.action:<11} {change.path}" + (f"  ({change.reason})" if change.reason else ""))
    for note in outcome.notes:
        print(f"note: {note}")
    if not outcome.changes:
        print(f"{ns.out}: up to date, nothing changed")
    return 0


def cmd_org(ns: argparse.Namespace) -> int:
    from fedpriv.commands.provisioning.join import accept_reply, init_org

    if ns.org_command == "init":
        outcome = init_org(ns.org, ns.kit, ns.federation)
        for path in outcome.created:
            print(f"created     {path}  (private: keep it on this machine)")
        for path in outcome.kept:
            print(f"kept        {path}")
        print(f"join request: {outcome.request_path}  (send it to the coordinator; it holds public keys only)")
        for name, value in outcome.request.fingerprints().items():
            print(f"  {name} key fingerprint {value}")
        print("Read these fingerprints to the coordinator over another channel (phone, signed mail).")
        return 0
    outcome = accept_reply(ns.reply, ns.kit)
    for path in outcome.written:
        print(f"written     {path}")
    for note in outcome.notes:
        print(f"note: {note}")
    if not outcome.written:
        print(f"{ns.kit}: up to date, nothing changed")
    return 0


def cmd_app(ns: argparse.Namespace) -> int:
    import tempfile
    from pathlib import Path

    from fedpriv.commands.app_source import NotAnAppCheckout, fab_sha256, stage_app
    from fedpriv.kernel.errors import UserError

    try:
        if ns.app and ns.stage:
            raise UserError("--stage: stages this checkout's app; give either APP or --stage")
        if ns.app:
            if not Path(ns.app).exists():
                raise UserError(f"{ns.app}: no such folder or file (expected a Flower app folder or a .fab file)")
            print(f"{fab_sha256(ns.app)}  {ns.app}")
        elif ns.stage:
            print(f"{fab_sha256(stage_app(Path(ns.stage)))}  {ns.stage}  (staged: flwr run {ns.stage} ...)")
        else:
            with tempfile.TemporaryDirectory(prefix="fedpriv-app-") as staging:
                print(f"{fab_sha256(stage_app(Path(staging) / 'app'))}  (this checkout's app, as fedpriv stages it)")
    except NotAnAppCheckout as exc:
        raise UserError(str(exc)) from None
    except ValueError as exc:  # flwr's build: not a Flower app
        raise UserError(f"{ns.app}: not a Flower app that `flwr run` can build ({exc})") from None
    return 0


def cmd_pki(ns: argparse.Namespace) -> int:
    from fedpriv.commands.provisioning.inspect import inspect_kit

    report = inspect_kit(ns.kit)
    print(report.render())
    return 0 if report.ok else 1


def cmd_federation(ns: argparse.Namespace) -> int:
    from fedpriv.commands.local_federation import federation_up

    result = federation_up(
        ns.federation,
        ns.kits,
        overrides=ns.args,
        rounds=ns.rounds,
        config_path=ns.config,
        out=ns.out,
        run_timeout=ns.timeout,
        verbose=ns.verbose,
        resume=ns.resume,
    )
    return result.returncode


def cmd_audit(ns: argparse.Namespace) -> int:
    from pathlib import Path

    from fedpriv.privacy.audit import audit, load_ledger_set
    from fedpriv.privacy.audit_report import markdown, write_reports

    roster = None
    if ns.roster:
        from fedpriv.commands.provisioning.federation import load_federation

        roster = [org.name for org in load_federation(ns.roster).organisations]
    ledger_set = load_ledger_set(ns.paths, ns.keys, roster=roster)
    result = audit(ledger_set, pld=not ns.no_pld, strict=ns.strict)
    first = Path(ns.paths[0])
    out = Path(ns.out) if ns.out else (first if first.is_dir() and (first / "ledgers").is_dir() else Path("."))
    paths = write_reports(result, out)
    print(f"audit: {result.verdict()}")
    print(markdown(result), end="")
    print("files: " + ", ".join(str(p) for p in paths))
    return 0 if result.ok else 1


def cmd_predict(ns: argparse.Namespace) -> int:
    import json
    import sys
    from dataclasses import asdict

    from fedpriv.kernel.errors import ConfigError
    from fedpriv.shared_models.predict import Predictor

    if ns.max_length is not None and ns.max_length < 1:
        raise ConfigError(f"--max-length {ns.max_length}: expected an integer >= 1 (tokens kept per text)")
    texts = list(ns.texts) or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    predictor = Predictor(ns.model_dir, max_length=ns.max_length)
    for start in range(0, len(texts), 32):
        for prediction in predictor.predict(texts[start : start + 32]):
            print(json.dumps(asdict(prediction), ensure_ascii=False))
    return 0


# the commands whose ``args`` start with an optional CONFIG.yaml (federation up takes key=value only)
_CONFIG_FIRST = ("simulate", "config")


def _late_positionals(parser: argparse.ArgumentParser, ns: argparse.Namespace, extra: list[str]) -> list[str]:
    """``args`` with the positionals argparse left over after an option (``simulate --dry-run a.b=1``).

    argparse fills a ``nargs="*"`` positional once, before the first option; what follows it comes back
    unparsed. Every command with ``key=value`` overrides takes them anywhere; a config file only first.
    """
    if not hasattr(ns, "args") or any(item.startswith("-") for item in extra):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args = [*ns.args, *extra]
    config_first = ns.command in _CONFIG_FIRST and args and "=" not in args[0]
    stray = [item for item in args[1 if config_first else 0 :] if "=" not in item]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)} (expected key=value overrides)")
    return args


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    ns, extra = parser.parse_known_args(argv)
    if extra:
        ns.args = _late_positionals(parser, ns, extra)
    handlers = {
        "simulate": cmd_simulate,
        "config": cmd_config,
        "provision": cmd_provision,
        "org": cmd_org,
        "app": cmd_app,
        "pki": cmd_pki,
        "federation": cmd_federation,
        "audit": cmd_audit,
        "predict": cmd_predict,
    }
    from fedpriv.kernel.interrupts import Interrupted, terminal_signals

    try:
        with terminal_signals():  # SIGTERM unwinds like Ctrl-C, once: one line, no traceback
            return handlers[ns.command](ns)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Interrupted as exc:  # a run stopped: what was stopped, where the run is, how to continue it
        _ignore_signals_if_a_program(argv)
        print(str(exc), file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        _ignore_signals_if_a_program(argv)
        print("interrupted", file=sys.stderr)
        return 130


def _ignore_signals_if_a_program(argv: list[str] | None) -> None:
    """The command is stopping: a second Ctrl-C must not kill the interpreter as it exits (main() called with its
    own arguments, from Python, leaves the caller's signal handling alone)."""
    if argv is None:
        import signal

        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)


if __name__ == "__main__":
    raise SystemExit(main())
