"""graphfix: make Llama-style models compile clean, then make them fast."""

from graphfix.diagnose import diagnose
from graphfix.errors import GraphfixError
from graphfix.findings import Category, Finding, Kind, Location
from graphfix.report import Report

__version__ = "0.1.0"

__all__ = ["Category", "Finding", "GraphfixError", "Kind", "Location", "Report", "__version__", "diagnose"]
