"""MkDocs hooks (``hooks:`` in mkdocs.yml), run on every ``mkdocs build`` / ``serve``.

- ``config-reference.md`` is generated from the config dataclasses (``raycxr.schema.SCHEMAS``), the allowed
  values in their field metadata (``schema.knob``), the composed defaults (``raycxr.config.compose``) and the
  comments in ``raycxr/configs/*.yaml``, so the page cannot drift from the code.
- ``<!-- include PATH -->`` in a page is replaced by that file (the runtime's model card lives in its package).
- ``benchmarks/results/`` is copied into the site so that pages can link the figures they quote; a page
  links them as ``../benchmarks/results/...``, which also works on GitHub.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import typing
from pathlib import Path

import yaml
from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, InclusionLevel

REPO = Path(__file__).resolve().parents[1]
RESULTS = "benchmarks/results"
_INCLUDE = re.compile(r"<!-- include (\S+) -->")
_KEY = re.compile(r"^(\s*)([A-Za-z_][\w\-]*):(.*)$")


# --------------------------------------------------------------------------------- mkdocs events


def on_files(files, config):
    files.append(File.generated(config, "config-reference.md", content=config_reference()))
    for path in sorted((REPO / RESULTS).rglob("*")):
        if path.is_file():
            files.append(File(str(path.relative_to(REPO)), str(REPO), config["site_dir"],
                              config["use_directory_urls"], inclusion=InclusionLevel.NOT_IN_NAV))
    return files


def on_page_markdown(markdown, page, config, files):
    src = Path(page.file.abs_src_path or REPO / "docs" / page.file.src_uri).parent

    def include(m: re.Match) -> str:
        path = src / m.group(1)
        if not path.is_file():
            raise PluginError(f"{page.file.src_uri}: <!-- include {m.group(1)} -->: no such file {path}")
        return path.read_text()

    markdown = _INCLUDE.sub(include, markdown)
    # pages under docs/ link results as ../benchmarks/results/ (true on GitHub); in the site they sit at the root
    if not page.file.src_uri.startswith(RESULTS):
        up = "../" * page.file.src_uri.count("/")
        markdown = re.sub(r"\]\((?:\.\./)+" + RESULTS, "](" + up + RESULTS, markdown)
    return markdown


# --------------------------------------------------------------------------------- configuration reference


def yaml_comments(path: Path, prefix: str = "") -> tuple[list[str], dict[str, str]]:
    """``(header lines, {dotted key: comment})`` of a config file; indented comment lines continue a key's."""
    header, docs, stack, last = [], {}, [], None
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            if last is None and not docs and not line.startswith(" "):
                header.append(stripped.lstrip("# ").rstrip())
            elif last is not None and line.startswith(" ") and docs.get(last):
                docs[last] += " " + stripped.lstrip("# ")
            continue
        m = _KEY.match(line)
        if not m or stripped.startswith("-"):
            last = None if stripped else last
            continue
        indent, key, rest = len(m.group(1)), m.group(2), m.group(3)
        stack = [(i, k) for i, k in stack if i < indent] + [(indent, key)]
        last = prefix + ".".join(k for _, k in stack)
        comment = re.split(r"\s#\s?", " " + rest, maxsplit=1)  # a comment starts at whitespace + '#'
        docs[last] = comment[1].strip() if len(comment) > 1 else ""
    return header, docs


def _type_name(tp: object) -> str:
    if dataclasses.is_dataclass(tp):
        return "section"
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is typing.Union and len(args) == 1:
        return _type_name(args[0]) + " | null"
    name = getattr(tp, "__name__", None) if not typing.get_args(tp) else None
    return name or str(tp).replace("typing.", "")


def _rule(metadata: typing.Mapping) -> str:
    """The allowed values a :func:`raycxr.schema.knob` carries in its field metadata."""
    if metadata.get("choices") is not None:
        return "one of " + ", ".join(f"`{v}`" for v in metadata["choices"])
    lowest = metadata.get("range", (None,))[0]
    return "" if lowest is None else f"≥ {lowest}"


def _value(value: object) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    text = text.removesuffix("\n...").removesuffix(" ...").strip()
    return f"`{text}`" if len(text) <= 60 else "(see the file)"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("<", "&lt;").replace("\n", " ")


def _rows(cls: type, data: dict, docs: dict, prefix: str = "", skip: set[str] = frozenset()):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        if key in skip:
            continue
        tp = hints[f.name]
        value = data.get(f.name) if isinstance(data, dict) else None
        if value is None and f.default is not dataclasses.MISSING and f.default != "???":
            value = f.default
        doc = f.metadata.get("doc") or docs.get(key, "")
        is_section = dataclasses.is_dataclass(tp)
        yield (key, _type_name(tp), "" if is_section else _value(value), _rule(f.metadata), doc)
        if is_section:
            yield from _rows(tp, value if isinstance(value, dict) else {}, docs, key + ".")


def config_reference() -> str:
    if str(REPO) not in sys.path:  # the checkout's raycxr, also when mkdocs runs from elsewhere
        sys.path.insert(0, str(REPO))
    from omegaconf import OmegaConf

    from raycxr import schema
    from raycxr.config import compose, config_dir

    out = ["# Configuration reference", "",
           "Generated by `docs/hooks.py` when the site is built, from the config dataclasses in `raycxr/schema.py` "
           "(names and types), their field metadata (docs, allowed values and lowest values), the composed defaults "
           "and the comments in `raycxr/configs/*.yaml`. Every key can be overridden on the command line "
           "(`raycxr pretrain image_size=224 'site_names=[nih,vindr]'`); a wrong key, type or value fails with one "
           "line naming it. `???` means the key has no default and must be given.", ""]
    for name, cls in schema.SCHEMAS.items():
        path = config_dir() / f"{name}.yaml"
        raw = yaml.safe_load(path.read_text()) or {}
        header, docs = yaml_comments(path)
        inherited = set()
        for entry in raw.get("defaults", []):
            if not isinstance(entry, str) or entry == "_self_":
                continue
            source, _, target = entry.partition("@")
            _, more = yaml_comments(config_dir() / f"{source}.yaml", f"{target}." if target else "")
            docs = {**more, **{k: v for k, v in docs.items() if v}}
            if not target:  # a whole command's config (tune, federate extend pretrain): list only what is new here
                inherited = {f.name for f in dataclasses.fields(schema.SCHEMAS[source])} - set(raw)
                header.append(f"Every key of `raycxr {source}` applies too; listed here are only the keys this "
                              f"file adds or sets differently from [`{source}`](#{source}).")
        data = OmegaConf.to_container(compose(name), resolve=False)
        out += [f"## {name}", "", f"`raycxr {name}`, `raycxr/configs/{name}.yaml`.", ""]
        out += [" ".join(line for line in header if line), ""] if any(header) else []
        out += ["| key | type | default | allowed | meaning |", "|---|---|---|---|---|"]
        for key, tp, default, rule, doc in _rows(cls, data, docs, skip=inherited):
            out.append(f"| `{key}` | {_cell(tp)} | {_cell(default)} | {_cell(rule)} | {_cell(doc)} |")
        out.append("")
    return "\n".join(out)
