"""A lab's own site adapter and export target, outside raycxr: made known by an entry point of an installed
package (group ``raycxr.plugins``), as CONTRIBUTING.md shows. Nothing in raycxr names them.

- adapter ``findings_json``: a folder of PNGs plus ``findings.json`` (``{"a.png": ["Effusion"], ...}``), the
  label space being every finding the file names;
- export target ``unfolded``: the TorchScript tracer without constant folding (the graph keeps its
  arithmetic as written).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from raycxr.export import register_exporter
from raycxr.sites.adapters import ParsedTable, SiteAdapter, register_adapter
from raycxr_runtime.contract import INPUT


@register_adapter("findings_json")
class FindingsJsonAdapter(SiteAdapter):
    """PNG images listed in ``findings.json`` with the findings each one shows (none: a normal image)."""

    description = "PNGs + findings.json ({image: [finding, ...]}), every listed finding a label"
    extensions = (".png",)

    def _parse(self, root: Path, index, opts) -> ParsedTable:
        table = root / "findings.json"
        if not table.is_file():
            raise FileNotFoundError(f"{table}: findings_json needs this file")
        findings = json.loads(table.read_text())
        names = sorted({f for fs in findings.values() for f in fs})
        ids = [Path(k).stem for k in findings]
        frame = pd.DataFrame({"image_id": ids, "expected": list(findings), "lookup": ids, "patient_id": ids,
                              "labels": [np.array([float(n in fs) for n in names]) for fs in findings.values()]})
        return ParsedTable(frame, names, [], {"tables": {"findings": str(table)}})


@register_exporter("unfolded")
def export_unfolded(module, example, path, output_names, *, opset):
    torch.onnx.export(module, (example,), str(path), dynamo=False, opset_version=int(opset), input_names=[INPUT],
                      output_names=output_names, dynamic_axes={n: {0: "batch"} for n in [INPUT, *output_names]},
                      do_constant_folding=False)
    return f"outside plug-in: TorchScript tracer without constant folding, opset {opset}"
