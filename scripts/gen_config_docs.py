"""Regenerate appliance.toml and the README configuration table from appliance/config.py."""

import re
from pathlib import Path

from appliance import config

root = Path(__file__).resolve().parents[1]
(root / "appliance.toml").write_text(config.render_sample())
readme = root / "README.md"
text = readme.read_text()
start, end = "<!-- generated: python -m appliance.config --markdown -->\n", "<!-- end generated -->"
text = re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _m: start + config.render_markdown_table() + end, text, flags=re.S)
readme.write_text(text)
print("regenerated appliance.toml and the README configuration table")
