"""Runtime sub-commands: `edgeact inspect BUNDLE`, `edgeact build-engines BUNDLE --target T` and `edgeact flash`; no torch."""
from __future__ import annotations

import json
import os
from typing import Any

from edgeact.runtime.bundle import ALLOW_UNVERIFIED_FLAG
from edgeact.runtime.bundle_store import DEFAULT_STORE
from edgeact.runtime.cli_args import console as _console


def register(subparsers) -> None:
    p = subparsers.add_parser("inspect", help="show what a bundle holds: model, stages, quantization, verification, engines")
    p.add_argument("bundle", metavar="BUNDLE", help="bundle directory (holds manifest.json)")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON instead of tables")
    p.add_argument("--verify", action="store_true", help="also check every file's sha256 (reads the whole bundle)")
    p.set_defaults(handler=_inspect)

    p = subparsers.add_parser("build-engines", help="build TensorRT engines for a bundle's stages on this GPU")
    p.add_argument("bundle", metavar="BUNDLE", help="bundle directory")
    p.add_argument("--target", required=True, metavar="T",
                   help="orin, orin-nx, orin-nano, thor, h100, h200, ada, ampere, a100 (must be this GPU)")
    p.add_argument("--workspace-gb", type=float, default=4.0, help="TensorRT builder workspace (default 4 GB)")
    p.add_argument("--timing-cache", metavar="PATH", help="timing cache file, read if present and saved after each stage")
    p.add_argument("--stages", nargs="+", metavar="STAGE", help="build only these stages (default: all)")
    p.add_argument(ALLOW_UNVERIFIED_FLAG, dest="allow_unverified", action="store_true",
                   help="build even if the bundle's verification failed")
    p.add_argument("--tf32", action="store_true",
                   help="let fp32 layers use TF32 on Ampere and later: faster, about 3 decimal digits (default off, "
                        "so engines compute what the bundle verified)")
    p.set_defaults(handler=_build_engines)

    p = subparsers.add_parser(
        "flash", help="install a bundle into this robot's bundle store (checked, engines built) and make it current",
        description="Install BUNDLE into the store: its files checked against the manifest as they are read, copied, "
                    "read back from the storage and checked again, TensorRT engines built for --target, then "
                    "STORE/current switched to it in one rename (the one it replaces stays as STORE/previous). "
                    "Robot configs name STORE/current as policy.path. Without BUNDLE: --list, --use, --rollback "
                    "or --remove.")
    p.add_argument("bundle", metavar="BUNDLE", nargs="?", help="the bundle directory to install (e.g. copied here "
                   "with rsync -a)")
    p.add_argument("--store", metavar="DIR", help=f"the bundle store (default {DEFAULT_STORE})")
    p.add_argument("--target", metavar="T", help="also build TensorRT engines for this GPU (orin, orin-nx, "
                   "orin-nano, thor, ...; must be this GPU; checked before anything is copied)")
    p.add_argument("--workspace-gb", type=float, default=4.0, help="TensorRT builder workspace with --target "
                   "(default 4 GB)")
    p.add_argument("--no-activate", dest="activate", action="store_false",
                   help="install only; current stays as it is (switch later with --use ID)")
    p.add_argument("--keep", type=int, metavar="N", help="afterwards keep at most N installed bundles, removing the "
                   "oldest (never current or previous)")
    p.add_argument(ALLOW_UNVERIFIED_FLAG, dest="allow_unverified", action="store_true",
                   help="install even if the bundle's verification failed")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--list", action="store_true", help="show the installed bundles, current and previous")
    mode.add_argument("--use", metavar="ID", help="make an installed bundle current (its id or a unique prefix)")
    mode.add_argument("--rollback", action="store_true", help="make the previous bundle current again")
    mode.add_argument("--remove", metavar="ID", help="remove an installed bundle (not the current one)")
    p.set_defaults(handler=_flash)


def _inspect(args) -> int:
    from edgeact.runtime.bundle import load_bundle

    bundle = load_bundle(args.bundle, verify_checksums=args.verify, allow_failed_verification=True)
    if args.json:
        print(json.dumps(bundle.manifest.to_dict(), indent=2))
        return 0
    console = _console()
    for renderable in _inspect_renderables(bundle, checked=args.verify):
        console.print(renderable)
    return 0


def _inspect_renderables(bundle, checked: bool) -> list:
    from rich.table import Table
    from rich.text import Text

    m = bundle.manifest
    files = m.files
    out: list = [Text(
        f"bundle {bundle.root}  ·  schema {m.schema_version}  ·  {m.tool.name} {m.tool.version}  ·  created {m.created_utc}\n"
        f"{len(files)} files, {_size(bundle.total_bytes())}; sizes checked, sha256 "
        + ("checked" if checked else "not checked (--verify)"))]

    cfg = bundle.config
    v, a, l = cfg.vit_config, cfg.adapter_config, cfg.llm_config
    model = Table(title="model", show_header=False)
    for key, value in (
        ("variant", f"{m.model.variant}" + (f" ({m.model.name})" if m.model.name else "")),
        ("decoder", f"{l.num_hidden_layers} layers, width {l.hidden_size}, {l.num_attention_heads} heads / "
                    f"{l.num_key_value_heads} KV heads of {l.head_dim}, MLP {l.intermediate_size}"),
        ("vocabulary", f"{l.vocab_size} + {l.additional_vocab_size} additional rows"),
        ("vision", f"{v.num_hidden_layers} layers, width {v.hidden_size}, {v.image_default_input_size[0]}x"
                   f"{v.image_default_input_size[1]} px, patch {v.image_patch_size}, layers {a.vit_layers} to the connector"),
        ("source", f"{m.model.source_checkpoint or '-'} (config sha256 {m.model.source_config_sha256[:12] or '-'})"),
        ("norm stats", ", ".join(sorted(m.norm_stats)) or "-"),
    ):
        model.add_row(key, Text(value))
    out.append(model)

    stages = Table(title="stages")
    for col in ("stage", "precision", "file", "size", "profiles", "dim ranges (min/opt/max)"):
        stages.add_column(col)
    io = Table(title="stage inputs and outputs")
    for col in ("stage", "", "name", "dtype", "dims", "doc"):
        io.add_column(col)
    for s in m.stages.values():
        size = sum(files[f].bytes for f in s.files())
        ranges = ", ".join(f"{k} {r.min}/{r.opt}/{r.max}" for k, r in s.dim_ranges.items())
        profiles = ", ".join(p.name for p in s.profiles) or "default"
        stages.add_row(*map(Text, (s.name, s.precision, s.file, _size(size), profiles, ranges)))
        for kind, tensors in (("in", s.inputs), ("out", s.outputs)):
            for t in tensors:
                io.add_row(*map(Text, (s.name, kind, t.name, t.dtype, "[" + ", ".join(map(str, t.dims)) + "]", t.doc)))
    out += [stages, io]

    if m.weights:
        weights = Table(title="weights")
        for col in ("name", "dtype", "shape", "file", "size"):
            weights.add_column(col)
        for w in m.weights.values():
            weights.add_row(*map(Text, (w.name, w.dtype, str(list(w.shape)), w.file, _size(files[w.file].bytes))))
        out.append(weights)

    q = m.quantization
    out.append(Text("quantization: " + (f"{q.recipe}  {_compact(q.options)}" if q else "none (exported precision)")))
    if q and q.report:
        out.append(_rows_table("quantization report", q.report))

    ver = m.verification
    out.append(Text(f"verification: {ver.status}"
                    + (f" (failing: {', '.join(r['gate'] for r in ver.failing())})" if ver.failing() else ""),
                    style={"passed": "green", "failed": "bold red"}.get(ver.status, "yellow")))
    if ver.results:
        out.append(_rows_table("verification results", list(ver.results)))

    if m.engines:
        engines = Table(title="engines")
        for col in ("target", "stage", "precision", "TF32", "TensorRT", "SM", "file", "size", "sha256", "profiles"):
            engines.add_column(col)
        for r in m.engines:
            engines.add_row(*map(Text, (r.target, r.stage, r.precision, _on_off(r.tf32), r.trt_version,
                                        r.compute_capability, r.file, _size(files[r.file].bytes), r.sha256[:12],
                                        ", ".join(r.profiles))))
        out.append(engines)
    else:
        out.append(Text("engines: none (build them on the target: edgeact build-engines BUNDLE --target T)"))
    return out


def _rows_table(title: str, data: Any):
    """A table from a report: a list of row dicts, a dict of row dicts, or a flat dict."""
    from rich.table import Table
    from rich.text import Text

    if isinstance(data, dict) and data and all(isinstance(v, dict) for v in data.values()):
        rows = [{"name": k, **v} for k, v in data.items()]
    elif isinstance(data, dict):
        rows = [{"key": k, "value": v} for k, v in data.items()]
    elif isinstance(data, list) and all(isinstance(r, dict) for r in data):
        rows = data
    else:
        rows = [{"value": data}]
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    table = Table(title=title)
    for col in columns:
        table.add_column(col)
    for row in rows:
        table.add_row(*(Text(_cell(row.get(col, ""))) for col in columns))
    return table


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return "pass" if value else "FAIL"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list)):
        return _compact(value)
    return str(value)


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(", ", ": "))


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _on_off(flag: bool) -> str:
    return "on" if flag else "off"


def _build_engines(args) -> int:
    # Lazy: the engine builder is only needed on a machine that builds engines (it imports no torch).
    from rich.table import Table
    from rich.text import Text

    from edgeact.export.engines import build_engines

    console = _console()

    def on_stage(name: str, index: int, total: int) -> None:
        console.print(f"building {name} for {args.target} ({index + 1}/{total}); TensorRT takes minutes per stage ...")

    records = build_engines(args.bundle, args.target, workspace_gb=args.workspace_gb, timing_cache=args.timing_cache,
                            stages=args.stages, allow_unverified=args.allow_unverified, on_stage=on_stage,
                            tf32=args.tf32)
    table = Table(title=f"engines built for {args.target}")
    for col in ("stage", "precision", "TF32", "file", "TensorRT", "SM", "profiles"):
        table.add_column(col)
    for r in records:
        table.add_row(*map(Text, (r.stage, r.precision, _on_off(r.tf32), r.file, r.trt_version, r.compute_capability,
                                  ", ".join(r.profiles))))
    console.print(table)
    return 0


def _flash(args) -> int:
    from edgeact.runtime.bundle_store import BundleStore
    from edgeact.runtime.cli import CommandError

    store = BundleStore(args.store)
    console = _console()
    modes = [name for name in ("list", "use", "rollback", "remove") if getattr(args, name)]
    if args.bundle is not None and modes:
        raise CommandError(f"give BUNDLE to install it, or --{modes[0]}, not both")
    if args.bundle is None and not modes:
        raise CommandError("nothing to do: give BUNDLE to install, or --list, --use ID, --rollback or --remove ID")
    for line in store.dangling():
        console.print(f"note: {line}", style="yellow")
    if args.list and store.root.is_dir() and os.access(store.root, os.W_OK):
        store.recover()         # puts back an entry a killed reinstall moved aside (a read-only store: as it is)
    if args.use:
        id_, before = store.use(args.use)
        console.print(f"current: {id_}" + (f" (was {before}; now previous)" if before else " (already)"))
    elif args.rollback:
        id_, before = store.rollback()
        console.print(f"rolled back: current is {id_} again, previous is {before}")
    elif args.remove:
        console.print(f"removed {store.remove(args.remove)} from {store.root}")
    elif args.bundle is not None:
        result = store.flash(args.bundle, target=args.target, activate=args.activate, keep=args.keep,
                             allow_unverified=args.allow_unverified, workspace_gb=args.workspace_gb,
                             on_step=console.print)
        if result.engines_built:
            console.print(f"engines for {args.target}: {', '.join(result.engines_built)}")
        if result.activated:
            console.print(f"current: {result.id}" + (f" (was {result.previous}; now previous, for --rollback)"
                                                    if result.previous else ""))
        else:
            console.print(f"installed {result.id}; current is unchanged (switch with --use {result.id})")
        for id_ in result.removed:
            console.print(f"removed {id_} (--keep {args.keep})")
        console.print(f"robot configs load it as policy.path: {store.root / 'current'}")
    if store.ids():
        console.print(_store_table(store))
    else:
        console.print(f"nothing installed in {store.root} yet: `edgeact flash BUNDLE --store {store.root}`")
    return 0


def _store_table(store):
    from rich.table import Table
    from rich.text import Text

    table = Table(title=f"bundles in {store.root}")
    for col in ("", "id", "model", "precision", "verification", "engines", "size", "installed (UTC)", "from"):
        table.add_column(col)
    for e in store.entries():
        mark = "current" if e.current else "previous" if e.previous else ""
        m = e.manifest
        if m is None:
            cells = (mark, e.id, Text(f"unreadable: {e.error}", style="bold red"), "", "", "", _size(e.bytes),
                     e.installed_utc or "", e.source or "")
        else:
            precisions = "/".join(sorted({s.precision for s in m.stages.values()}))
            engines = ", ".join(sorted({r.target for r in m.engines})) or "-"
            cells = (mark, e.id, m.model.name or m.model.variant, precisions, m.verification.status, engines,
                     _size(e.bytes), e.installed_utc or "", e.source or "")
        table.add_row(*(c if isinstance(c, Text) else Text(str(c)) for c in cells),
                      style="bold" if e.current else None)
    return table
