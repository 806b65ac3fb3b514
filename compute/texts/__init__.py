"""Description pools: the bundled ones by name ('general', 'shapes') or a user's .txt / .csv file."""
from __future__ import annotations

import csv
import string
from dataclasses import dataclass
from pathlib import Path

from compute.errors import AtlasError
from compute.organisms import is_organism_architecture

HERE = Path(__file__).parent
BUNDLED = {"general": HERE / "general.csv", "shapes": HERE / "shapes.csv"}
MAX_WORDS = 30
#: Zero-shot prompt per model family: the Shapes CLIP's captions never say "a photo of".
TEMPLATES = {"shapes": "a {}", "default": "a photo of a {}."}


def zero_shot_template(architecture: str) -> str:
    """The prompt template a model's zero-shot classification uses, the same in metrics, eval and the dashboard."""
    return TEMPLATES["shapes" if is_organism_architecture(architecture) else "default"]


def fill_template(template: str, labels: list[str]) -> list[str]:
    """Each label in a prompt template with exactly one {} (a literal brace is {{ or }})."""
    try:
        fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(template) if name is not None]
    except ValueError:
        fields = None
    if fields != [("", "", None)]:
        shown = template if len(template) <= 60 else template[:57] + "..."
        raise AtlasError(f"the prompt template {shown!r} needs a {{}} where the label goes, and no other "
                         "braces (write {{ or }} for a literal one)")
    return [template.format(label) for label in labels]


@dataclass
class Pool:
    texts: list[str]
    tags: list[list[str]]       # empty lists for an untagged pool
    source: str

    @property
    def tagged(self) -> bool:
        return any(self.tags)


def load_pool(name_or_path: str) -> Pool:
    """A pool by bundled name or path: .txt (one description a line) or .csv (text[,tags] with ';'-separated tags)."""
    path = BUNDLED.get(name_or_path, Path(name_or_path))
    if not path.is_file():
        raise AtlasError(f"description pool not found: {name_or_path} (bundled: {', '.join(BUNDLED)})")
    texts, tags, seen = [], [], set()
    try:
        with open(path, newline="", encoding="utf-8") as f:
            if path.suffix.lower() == ".csv":
                reader = csv.DictReader(f)
                if not reader.fieldnames or "text" not in reader.fieldnames:
                    raise AtlasError(f"{path}: a CSV pool needs a 'text' column (and optionally 'tags')")
                rows = [(r["text"], r.get("tags") or "") for r in reader]
            else:
                rows = [(line, "") for line in f]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise AtlasError(f"cannot read pool {path}: {e}") from None
    for text, tag_str in rows:
        text = " ".join((text or "").split())
        if not text or text in seen or len(text.split()) > MAX_WORDS:
            continue
        seen.add(text)
        texts.append(text)
        tags.append([t.strip() for t in tag_str.split(";") if t.strip()])
    if len(texts) < 2:
        raise AtlasError(f"pool {path} has fewer than 2 usable descriptions")
    return Pool(texts, tags, str(path))
