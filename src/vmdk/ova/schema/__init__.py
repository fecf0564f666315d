"""Validating a descriptor against the DMTF OVF schema shipped beside this module.

lxml validates in-process; without it, xmllint (Debian: libxml2-utils) does.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from typing import Any

ENVELOPE_XSD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dsp8023_1.1.1.xsd")
#: A descriptor breaking the schema everywhere would otherwise print thousands of lines.
MAX_ERRORS = 10


class SchemaUnavailable(Exception):
    """Neither lxml nor xmllint is there to validate with."""


def validate(ovf: bytes) -> list[str]:
    """The schema's complaints about ``ovf`` ("line N: message"); empty when it validates."""
    try:
        return _with_lxml(ovf)
    except ImportError:
        pass
    if shutil.which("xmllint"):
        return _with_xmllint(ovf)
    raise SchemaUnavailable("the OVF schema check needs lxml (pip install 'vmdk[ova]') or "
                            "xmllint (libxml2-utils)")


def _with_lxml(ovf: bytes) -> list[str]:
    import importlib

    etree: Any = importlib.import_module("lxml.etree")  # an optional dependency, untyped

    schema = etree.XMLSchema(etree.parse(ENVELOPE_XSD))
    parser = etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False)
    try:
        doc = etree.fromstring(ovf, parser)
    except etree.XMLSyntaxError as exc:
        return [str(exc)]
    if schema.validate(doc):
        return []
    return [f"line {e.line}: {e.message}" for e in list(schema.error_log)[:MAX_ERRORS]]


def _with_xmllint(ovf: bytes) -> list[str]:
    with tempfile.NamedTemporaryFile(suffix=".ovf") as f:
        f.write(ovf)
        f.flush()
        done = subprocess.run(["xmllint", "--noout", "--nonet", "--schema", ENVELOPE_XSD,
                               f.name], capture_output=True, text=True, timeout=120,
                              check=False)
    if done.returncode == 0:
        return []
    lines = [line.replace(f.name + ":", "line ", 1) for line in done.stderr.splitlines()
             if line.startswith(f.name + ":")]
    return lines[:MAX_ERRORS] or [done.stderr.strip()[:500]]


__all__ = ["ENVELOPE_XSD", "SchemaUnavailable", "validate"]
