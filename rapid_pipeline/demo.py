"""Write the deterministic synthetic ``demo`` domain: a small KG + image-text pairs + known bad rows.

    rapid demo-data --out landing/demo --seed 0 --pairs 2000               # one drop in DIR
    rapid demo-data --out landing/demo --days 3 --start 2025-01-01         # DIR/2025-01-01/ ... 3 drops
    rapid demo-data --out landing/demo --days 1                             # DIR/2025-01-01/

The paper's Figure 3 idea: captions name entities whose LOOK the KG defines (颜色 / 形状 / 类别), and each
image is that shape filled with that colour, so a tiny model can learn colour/shape conditioning on CPU.

One drop (DIR or DIR/<date>/)::

    kg/triples.tsv  kg/triples.nt                     the same facts (TSV header head/relation/tail; N-Triples)
    pairs/wukong.csv  pairs/images/*.jpg|png          Wukong layout (url,caption); urls relative to the CSV
    pairs/img2dataset/00000.tar                       img2dataset layout (NNNNNNNNN.jpg/.txt/.json)
    labels.jsonl                                      gold entity mentions per accepted caption
    expected.json                                     exact counts a correct `rapid ingest pairs DROP/pairs` produces

Invariants:
* Deterministic: the same (seed, pairs, days, start) gives byte-identical files (seeded RNGs, fixed
  encoder settings, sorted tar members with fixed mtimes); a different seed gives different pairs.
* The KG is written into EVERY drop (identical each time), so any one drop ingests end to end and
  re-ingesting the KG is idempotent; downstream dedupes triples by (head, relation, tail).
* ``--pairs N`` = clean pairs per drop (4/5 in the CSV, 1/5 in the tar); on top of them every drop
  carries the same catalogue of bad rows (`BAD_ROWS`), whose outcomes expected.json lists.
* Label offsets are code-point offsets into the normalised caption (`core.text.normalize(raw).text`),
  the same coordinates as the ``links`` table.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import io
import json
import math
import os
import random
import shutil
import struct
import tarfile
import uuid
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .core.atomic import staging_dir
from .core.config import add_config_args, config_from_args, opt
from .core.text import normalize
from .ingest.blobs import syncfs

DEMO_DOMAIN = "demo"
KG_BASE = "http://kg.rapid/"

COLOURS = {
    "红色": (215, 30, 40), "黄色": (245, 210, 35), "绿色": (45, 165, 60), "紫色": (125, 45, 160),
    "蓝色": (35, 85, 215), "橙色": (245, 135, 25), "粉色": (245, 145, 185), "棕色": (125, 75, 35),
    "白色": (248, 248, 248),
}
SHAPES = ("圆形", "椭圆形", "心形", "长条形", "方形", "三角形", "星形", "菱形")


def _e(name, colour, shape, category, *aliases, part_of=None, made_of=None):
    return {"name": name, "aliases": list(aliases), "colour": colour, "shape": shape, "category": category,
            "part_of": part_of, "made_of": made_of}


# Aliases include traditional forms (蘋果) and common alternative names (士多啤梨); 葡萄 is the same in both scripts.
ENTITIES: list[dict] = [
    _e("草莓", "红色", "心形", "水果", "士多啤梨", "洋莓"),
    _e("苹果", "红色", "圆形", "水果", "蘋果"),
    _e("红富士苹果", "红色", "圆形", "水果", "紅富士蘋果", part_of="苹果"),
    _e("青苹果", "绿色", "圆形", "水果", "青蘋果", part_of="苹果"),
    _e("香蕉", "黄色", "长条形", "水果", "芎蕉"),
    _e("柠檬", "黄色", "椭圆形", "水果", "檸檬"),
    _e("葡萄", "紫色", "圆形", "水果", "提子"),
    _e("西瓜", "绿色", "圆形", "水果", "寒瓜"),
    _e("蓝莓", "蓝色", "圆形", "水果", "藍莓"),
    _e("橙子", "橙色", "圆形", "水果", "柳橙", "甜橙"),
    _e("樱桃", "红色", "心形", "水果", "櫻桃", "车厘子"),
    _e("芒果", "黄色", "椭圆形", "水果", "檬果"),
    _e("猕猴桃", "绿色", "椭圆形", "水果", "奇异果", "獼猴桃"),
    _e("桃子", "粉色", "心形", "水果", "毛桃"),
    _e("菠萝", "黄色", "椭圆形", "水果", "凤梨", "鳳梨"),
    _e("火龙果", "粉色", "椭圆形", "水果", "火龍果"),
    _e("椰子", "棕色", "圆形", "水果", "椰果"),
    _e("番茄", "红色", "圆形", "蔬菜", "西红柿", "西紅柿"),
    _e("茄子", "紫色", "长条形", "蔬菜", "矮瓜"),
    _e("黄瓜", "绿色", "长条形", "蔬菜", "青瓜", "黃瓜"),
    _e("胡萝卜", "橙色", "三角形", "蔬菜", "红萝卜", "胡蘿蔔"),
    _e("玉米", "黄色", "长条形", "蔬菜", "苞米"),
    _e("南瓜", "橙色", "圆形", "蔬菜", "倭瓜"),
    _e("草莓蛋糕", "粉色", "三角形", "食物", "士多啤梨蛋糕", made_of="草莓"),
    _e("苹果派", "棕色", "三角形", "食物", "蘋果派", made_of="苹果"),
    _e("巧克力", "棕色", "方形", "食物", "朱古力"),
    _e("饼干", "棕色", "圆形", "食物", "曲奇", "餅乾"),
    _e("披萨", "黄色", "三角形", "食物", "比萨", "薄餅"),
    _e("汉堡", "棕色", "圆形", "食物", "漢堡"),
    _e("甜甜圈", "粉色", "圆形", "食物", "多拿滋"),
    _e("面包", "棕色", "方形", "食物", "麵包"),
    _e("冰淇淋", "白色", "三角形", "食物", "雪糕"),
    _e("月饼", "棕色", "圆形", "食物", "月餅"),
    _e("粽子", "绿色", "三角形", "食物", "角黍"),
    _e("星星", "黄色", "星形", "物品", "星"),
    _e("气球", "红色", "圆形", "物品", "氣球"),
    _e("积木", "蓝色", "方形", "物品", "積木"),
    _e("铅笔", "黄色", "长条形", "物品", "鉛筆"),
    _e("足球", "白色", "圆形", "物品", "英式足球"),
    _e("篮球", "橙色", "圆形", "物品", "籃球"),
    _e("风筝", "红色", "菱形", "物品", "風箏", "纸鸢"),
    _e("钻石", "蓝色", "菱形", "物品", "鑽石", "金刚石"),
    _e("礼物盒", "红色", "方形", "物品", "禮物盒"),
    _e("紫水晶", "紫色", "菱形", "物品", "紫晶"),
]

TEMPLATES_ONE = ("一张{a}的照片", "桌上放着一个{a}", "一个{a}放在桌子上", "{a}的特写", "画面中央有一个{a}",
                 "简单背景上的{a}", "第１２３号样品：{a}", "ＡＢＣ超市的{a}", "一張{a}的照片", "桌上放著一個{a}",
                 "这是\u200b一个{a}", "{a}，高清图片")
TEMPLATES_TWO = ("{a}和{b}", "{a}与{b}的照片", "桌上有{a}，还有{b}", "一張{a}和{b}的照片")


@dataclass(frozen=True)
class DemoConfig:
    seed: int = opt(0, "random seed: same seed -> byte-identical output")
    pairs: int = opt(2000, "clean image-text pairs per drop (bad rows are added on top)")
    days: int | None = opt(None, "write this many daily drops DIR/<YYYY-MM-DD>/ (default: one drop directly in DIR)")
    start: str | None = opt(None, "date of the first daily drop, YYYY-MM-DD (default 2025-01-01; implies --days 1 if --days is not given)")
    domain: str = opt(DEMO_DOMAIN, "domain name written into expected.json")
    min_size: int = opt(64, "smallest side of a clean image in pixels")
    max_size: int = opt(128, "largest side of a clean image in pixels (<= 256)")


# --------------------------------------------------------------------------- KG

def kg_triples() -> list[tuple[str, str, str]]:
    out = []
    for ent in ENTITIES:
        out += [(ent["name"], "颜色", ent["colour"]), (ent["name"], "形状", ent["shape"]), (ent["name"], "类别", ent["category"])]
        # Aliases alternate 别名 / 又称 so the KG ingest sees both alias relations.
        out += [(ent["name"], "别名" if i % 2 == 0 else "又称", alias) for i, alias in enumerate(ent["aliases"])]
        if ent["part_of"]:
            out.append((ent["name"], "属于", ent["part_of"]))
        if ent["made_of"]:
            out.append((ent["name"], "原料", ent["made_of"]))
    return out


_IRI_FORBIDDEN = set('<>"{}|^`\\% ')


def _iri(kind: str, name: str) -> str:
    # Keep CJK readable (IRIs allow it); percent-encode what N-Triples IRIs forbid (controls, space, <>"{}|^`\) and '%'.
    enc = "".join("".join(f"%{b:02X}" for b in ch.encode()) if ch in _IRI_FORBIDDEN or ord(ch) < 0x21 else ch for ch in name)
    return "<" + KG_BASE + kind + "/" + enc + ">"


def _nt_literal(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r") + '"'


def kg_files(triples: list[tuple[str, str, str]]) -> dict[str, bytes]:
    """TSV + N-Triples: heads are entity IRIs, relations relation IRIs, tails (values, aliases) literals."""
    heads = {h for h, _, _ in triples}
    tsv = "head\trelation\ttail\n" + "".join(f"{h}\t{r}\t{t}\n" for h, r, t in triples)
    nt_lines = []
    for h, r, t in triples:
        tail = _iri("e", t) if r in ("属于", "原料") and t in heads else _nt_literal(t)
        nt_lines.append(f"{_iri('e', h)} {_iri('r', r)} {tail} .\n")
    return {"kg/triples.tsv": tsv.encode(), "kg/triples.nt": "".join(nt_lines).encode()}


# --------------------------------------------------------------------------- drawing

def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape in ("圆形", "椭圆形"):
        sx = 1.0 if shape == "圆形" else 1.0
        sy = 1.0 if shape == "圆形" else 0.65
        pts = [(sx * math.cos(t), sy * math.sin(t)) for t in np.linspace(0, 2 * math.pi, 40, endpoint=False)]
    elif shape == "心形":
        ts = np.linspace(0, 2 * math.pi, 48, endpoint=False)
        pts = [(16 * math.sin(t) ** 3 / 17, -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)) / 17) for t in ts]
    elif shape == "长条形":
        pts = [(-1, -0.28), (1, -0.28), (1, 0.28), (-1, 0.28)]
    elif shape == "方形":
        pts = [(-0.75, -0.75), (0.75, -0.75), (0.75, 0.75), (-0.75, 0.75)]
    elif shape == "三角形":
        pts = [(0, -1), (0.9, 0.7), (-0.9, 0.7)]
    elif shape == "星形":
        pts = [((1 if i % 2 == 0 else 0.42) * math.sin(i * math.pi / 5), -(1 if i % 2 == 0 else 0.42) * math.cos(i * math.pi / 5)) for i in range(10)]
    else:  # 菱形
        pts = [(0, -1), (0.65, 0), (0, 1), (-0.65, 0)]
    ca, sa = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * ca - y * sa), cy + r * (x * sa + y * ca)) for x, y in pts]


def _background(rng: random.Random, w: int, h: int, colour: tuple[int, int, int]) -> Image.Image:
    bright = sum(colour) / 3 > 200
    base = np.array(rng.choice([(70, 70, 80), (40, 60, 70)] if bright else [(225, 225, 225), (240, 232, 215), (210, 220, 230)]), dtype=np.int16)
    noise = np.random.default_rng(rng.getrandbits(32)).integers(-6, 7, size=(h, w, 1), dtype=np.int16)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")


def draw_scene(rng: random.Random, entities: list[dict], w: int, h: int) -> Image.Image:
    """Each entity's shape in its KG colour, position/size/rotation jittered; two objects side by side."""
    img = _background(rng, w, h, COLOURS[entities[0]["colour"]])
    draw = ImageDraw.Draw(img)
    n = len(entities)
    for i, ent in enumerate(entities):
        cell = w / n
        r = min(cell, h) * rng.uniform(0.28, 0.42)
        cx = cell * (i + 0.5) + rng.uniform(-0.1, 0.1) * cell
        cy = h / 2 + rng.uniform(-0.12, 0.12) * h
        angle = rng.uniform(-0.4, 0.4) if ent["shape"] != "圆形" else 0.0
        draw.polygon(_polygon(ent["shape"], cx, cy, r, angle), fill=COLOURS[ent["colour"]])
    return img


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 90, "optimize": False} if fmt == "JPEG" else {"optimize": False}) | kw)
    return buf.getvalue()


# --------------------------------------------------------------------------- captions

def _surface(rng: random.Random, ent: dict) -> str:
    roll = rng.random()
    if roll < 0.6 or not ent["aliases"]:
        return ent["name"]
    return rng.choice(ent["aliases"])


def make_caption(rng: random.Random, ents: list[dict]) -> tuple[str, list[tuple[dict, str]]]:
    """Caption text + the (entity, surface) mentions in order of appearance."""
    template = rng.choice(TEMPLATES_ONE if len(ents) == 1 else TEMPLATES_TWO)
    surfaces = [_surface(rng, e) for e in ents]
    return template.format(a=surfaces[0], b=surfaces[-1]), list(zip(ents, surfaces))


def gold_mentions(raw: str, mentions: list[tuple[dict, str]]) -> tuple[str, list[dict]]:
    """Offsets of each mention in the normalised caption (searched left to right)."""
    text = normalize(raw).text
    out, pos = [], 0
    for ent, surface in mentions:
        norm = normalize(surface).text
        start = text.index(norm, pos)
        out.append({"entity": ent["name"], "start": start, "end": start + len(norm), "surface": norm})
        pos = start + len(norm)
    return text, out


def pair_id(image_sha: str, caption: str) -> str:
    return hashlib.sha256((image_sha + "\0" + caption).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- clean pairs

@dataclass
class Sample:
    name: str            # file name (CSV images) or tar key
    data: bytes
    raw_caption: str
    mentions: list
    fmt: str


def clean_sample(rng: random.Random, cfg: DemoConfig, index: int) -> Sample:
    k = 2 if rng.random() < 0.2 else 1
    ents = rng.sample(ENTITIES, k)
    h = rng.randint(cfg.min_size, cfg.max_size)
    # Two objects sit side by side, so their canvas is wider (aspect stays <= 2, inside the 3.0 limit).
    w = min(cfg.max_size * 2, 2 * h) if k == 2 else rng.randint(max(cfg.min_size, int(h * 0.6)), min(cfg.max_size, int(h * 1.6)))
    img = draw_scene(rng, ents, w, h)
    fmt = "PNG" if rng.random() < 0.15 else "JPEG"
    raw, mentions = make_caption(rng, ents)
    ext = "png" if fmt == "PNG" else "jpg"
    return Sample(f"{index:06d}.{ext}", encode(img, fmt), raw, mentions, fmt)


# --------------------------------------------------------------------------- special images

def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(width: int = 10_000, height: int = 10_000) -> bytes:
    """A tiny PNG whose IHDR claims width x height (100 MP by default): the header guard must stop it."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + _png_chunk(b"IEND", b"")


def exif_rotated_jpeg(rng: random.Random) -> bytes:
    """Stored 128x64: left half red, right half blue; EXIF orientation 6 -> shown 64x128, red on top."""
    img = Image.new("RGB", (128, 64), (30, rng.randint(20, 40), 220))
    ImageDraw.Draw(img).rectangle([0, 0, 63, 63], fill=(220, rng.randint(20, 40), 30))
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(img, "JPEG", exif=exif.tobytes())


def converted_images(rng: random.Random) -> dict[str, bytes]:
    """The five odd-but-valid images ingest must ACCEPT and convert to RGB (seeded: unique per drop)."""
    ent = next(e for e in ENTITIES if e["name"] == "草莓")
    base = draw_scene(rng, [ent], 96, 96)
    grey = np.full((80, 80), 32768, dtype=np.uint16)
    grey[-1] = np.random.default_rng(rng.getrandbits(32)).integers(0, 65535, 80, dtype=np.uint16)
    rgba = Image.new("RGBA", (80, 80), (0, 0, 0, 0))
    ImageDraw.Draw(rgba).polygon(_polygon("心形", 40 + rng.randint(-3, 3), 40, 30, 0), fill=(215, 30, 40, 255))
    noise = np.random.default_rng(rng.getrandbits(32)).integers(0, 256, (1, 80, 4), dtype=np.uint8)
    rgba.paste(Image.fromarray(noise, "RGBA"), (0, 79))  # a seeded bottom row: no two drops share these bytes
    return {
        "cmyk.jpg": encode(base.convert("CMYK"), "JPEG"),
        "gray16.png": encode(Image.fromarray(grey), "PNG"),
        "palette.png": encode(base.convert("P", palette=Image.Palette.ADAPTIVE, colors=16), "PNG"),
        "rgba.png": encode(rgba, "PNG"),
        "exif_rotated.jpg": exif_rotated_jpeg(rng),
    }


# --------------------------------------------------------------------------- CSV

def csv_line(fields: list[str]) -> bytes:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(fields)
    return buf.getvalue().encode("utf-8")


def bad_rows(rng: random.Random, images: dict[str, bytes]) -> list[tuple[bytes, str]]:
    """(CSV line bytes, expected outcome: 'accepted' | 'duplicate' | reason code). Also fills `images`."""
    cap = "一张草莓的照片"
    ent = next(e for e in ENTITIES if e["name"] == "草莓")
    good = encode(draw_scene(rng, [ent], 96, 96), "JPEG")
    truncated = encode(draw_scene(rng, [ent], 96, 96), "JPEG")
    images.update({"bad_ok.jpg": good, "bad_ok_copy.jpg": good, "zero.jpg": b"", "truncated.jpg": truncated[: len(truncated) // 2],
                   "bomb.png": bomb_png(), "tiny.jpg": encode(draw_scene(rng, [ent], 32, 32), "JPEG"),
                   "wide.jpg": encode(draw_scene(rng, [ent], 300, 64), "JPEG")})
    rows = [
        (csv_line(["images/bad_ok.jpg", cap]), "accepted"),
        (csv_line(["images/bad_ok.jpg", cap]), "duplicate"),          # exact duplicate row
        (csv_line(["images/bad_ok_copy.jpg", cap]), "duplicate"),     # same bytes, other name, same caption
        (csv_line(["images/bad_ok.jpg", ""]), "empty_text"),          # caption empty
        (csv_line(["images/bad_ok.jpg", "\u200b \u200d"]), "empty_text"),  # only invisible characters
        (b"images/bad_ok.jpg,\"\xe8\x8d\x89\xff\xfe\xe8\x8e\x93\"\n", "invalid_utf8"),
        (b"images/bad_ok.jpg,\"\xe8\x8d\x89\x00\xe8\x8e\x93\"\n", "nul_byte"),
        (csv_line(["images/bad_ok.jpg", "草" * 350_000]), "too_long"),   # a ~1 MB caption
        (csv_line(["images/bad_ok.jpg", cap, "extra"]), "bad_row"),   # wrong column count
        (csv_line(["images/only_one_column.jpg"]), "bad_row"),
        (csv_line(["images/does_not_exist.jpg", cap]), "missing_image"),
        (csv_line(["https://example.com/remote.jpg", cap]), "remote_url"),
        (csv_line(["images/zero.jpg", cap]), "empty_image"),
        (csv_line(["images/truncated.jpg", cap]), "undecodable"),
        (csv_line(["images/bomb.png", cap]), "too_many_pixels"),
        (csv_line(["images/tiny.jpg", cap]), "too_small"),
        (csv_line(["images/wide.jpg", cap]), "bad_aspect"),
    ]
    return rows


# --------------------------------------------------------------------------- one drop

def _tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o644, "", ""
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _label(source: str, pos: int, url: str, sample_bytes: bytes, raw: str, mentions) -> dict:
    text, gold = gold_mentions(raw, mentions)
    sha = hashlib.sha256(sample_bytes).hexdigest()
    return {"source_file": source, "source_pos": pos, "url": url, "pair_id": pair_id(sha, text),
            "caption_raw": raw, "caption": text, "mentions": gold}


class DropWriter:
    """Builds one drop's files in memory-light steps and tallies the expected ingest outcome."""

    def __init__(self, cfg: DemoConfig, rng: random.Random):
        self.cfg, self.rng = cfg, rng
        self.files: dict[str, bytes] = {}
        self.outcomes: Counter = Counter()
        self.labels: list[dict] = []

    def csv_part(self, n_clean: int) -> None:
        images: dict[str, bytes] = {}
        lines = [csv_line(["url", "caption"])]
        for i in range(n_clean):
            s = clean_sample(self.rng, self.cfg, i)
            images[s.name] = s.data
            lines.append(csv_line([f"images/{s.name}", s.raw_caption]))
            self.labels.append(_label("wukong.csv", len(lines), f"images/{s.name}", s.data, s.raw_caption, s.mentions))
            self.outcomes["accepted"] += 1
        self._converted(images, lines)
        for line, outcome in bad_rows(self.rng, images):
            lines.append(line)
            self.outcomes[outcome] += 1
            if outcome == "accepted":
                ent = next(e for e in ENTITIES if e["name"] == "草莓")
                self.labels.append(_label("wukong.csv", len(lines), "images/bad_ok.jpg", images["bad_ok.jpg"], "一张草莓的照片", [(ent, "草莓")]))
        self.files["pairs/wukong.csv"] = b"".join(lines)
        self.files.update({f"pairs/images/{k}": v for k, v in images.items()})

    def _converted(self, images: dict[str, bytes], lines: list[bytes]) -> None:
        ent = next(e for e in ENTITIES if e["name"] == "草莓")
        for name, data in converted_images(self.rng).items():
            images[name] = data
            raw = f"一张草莓的照片（{name.split('.')[0]}）"
            lines.append(csv_line([f"images/{name}", raw]))
            self.labels.append(_label("wukong.csv", len(lines), f"images/{name}", data, raw, [(ent, "草莓")]))
            self.outcomes["accepted"] += 1

    def tar_part(self, n_clean: int) -> None:
        members = []
        for i in range(n_clean):
            s = clean_sample(self.rng, self.cfg, i)
            key = f"{i:09d}"
            img = Image.open(io.BytesIO(s.data))
            data = s.data if s.fmt == "JPEG" else encode(img.convert("RGB"), "JPEG")  # img2dataset stores .jpg
            meta = {"url": f"https://img.example/{key}.jpg", "caption": s.raw_caption, "key": key, "status": "success",
                    "width": img.width, "height": img.height}
            members += [(f"{key}.jpg", data), (f"{key}.txt", s.raw_caption.encode()), (f"{key}.json", json.dumps(meta, ensure_ascii=False, sort_keys=True).encode())]
            self.labels.append(_label("img2dataset/00000.tar", i, meta["url"], data, s.raw_caption, s.mentions))
            self.outcomes["accepted"] += 1
        # One sample whose caption is missing (no .txt, no caption in .json): quarantined as missing_caption.
        key = f"{n_clean:09d}"
        data = encode(draw_scene(self.rng, [ENTITIES[1]], 80, 80), "JPEG")
        members += [(f"{key}.jpg", data), (f"{key}.json", json.dumps({"key": key, "status": "success", "url": None, "caption": None}).encode())]
        self.outcomes["missing_caption"] += 1
        self.files["pairs/img2dataset/00000.tar"] = _tar_bytes(members)

    def expected(self, kg: list[tuple[str, str, str]]) -> dict:
        special = {"accepted", "duplicate"}
        reasons = {k: v for k, v in sorted(self.outcomes.items()) if k not in special}
        return {"domain": self.cfg.domain, "rows_in": sum(self.outcomes.values()), "accepted": self.outcomes["accepted"],
                "duplicates": self.outcomes["duplicate"], "quarantined": sum(reasons.values()), "quarantined_by_reason": reasons,
                "ingest": "rapid ingest pairs <drop>/pairs --domain <domain> --partition <date or manual>",
                "kg": {"triples": len(kg), "relations": len({r for _, r, _ in kg}),
                       "heads": len({h for h, _, _ in kg}),
                       "names": len({h for h, _, _ in kg} | {t for _, _, t in kg})}}


def build_drop(cfg: DemoConfig, seed_key: str) -> dict[str, bytes]:
    """All files of one drop (relative path -> bytes)."""
    rng = random.Random(seed_key)
    n_tar = cfg.pairs // 5
    writer = DropWriter(cfg, rng)
    writer.csv_part(cfg.pairs - n_tar)
    writer.tar_part(n_tar)
    kg = kg_triples()
    writer.files.update(kg_files(kg))
    writer.files["labels.jsonl"] = "".join(json.dumps(x, ensure_ascii=False, sort_keys=True) + "\n" for x in writer.labels).encode()
    writer.files["expected.json"] = (json.dumps(writer.expected(kg), ensure_ascii=False, indent=1, sort_keys=True) + "\n").encode()
    return writer.files


def _drop_dates(cfg: DemoConfig) -> list[str | None]:
    if cfg.days is None and cfg.start is None:
        return [None]
    first = dt.date.fromisoformat(cfg.start or "2025-01-01")
    return [(first + dt.timedelta(days=i)).isoformat() for i in range(cfg.days or 1)]


def _validate(cfg: DemoConfig) -> None:
    if cfg.pairs < 1 or (cfg.days is not None and cfg.days < 1):
        raise ValueError("--pairs and --days must be >= 1")
    if cfg.start is not None:
        try:
            dt.date.fromisoformat(cfg.start)
        except ValueError:
            raise ValueError(f"--start {cfg.start!r} is not a YYYY-MM-DD date") from None
    if not 64 <= cfg.min_size <= cfg.max_size <= 256:
        raise ValueError("need 64 <= --min-size <= --max-size <= 256")


def write_demo(out: Path, config: DemoConfig) -> dict:
    """Write the drop(s) under `out` (each drop built in a staging folder, then swapped in)."""
    _validate(config)
    out = Path(out)
    drops = []
    for day_index, date in enumerate(_drop_dates(config)):
        files = build_drop(config, f"rapid-demo:{config.seed}:{day_index}")
        target = out if date is None else out / date
        drops.append(_publish_drop(target, files, date))
    return {"out": str(out), "seed": config.seed, "domain": config.domain, "drops": drops}


def _publish_drop(target: Path, files: dict[str, bytes], date: str | None) -> dict:
    stage = staging_dir(target)
    for rel, data in sorted(files.items()):
        (stage / rel).parent.mkdir(parents=True, exist_ok=True)
        (stage / rel).write_bytes(data)
    syncfs(stage)  # one flush for thousands of small files, then the atomic swap
    names = ("kg", "pairs", "labels.jsonl", "expected.json") if date is None and target.exists() else None
    if names:  # DIR itself is the drop: replace only the drop's own entries, never unrelated files in DIR
        for name in names:
            swap_in(stage / name, target / name)
        stage.rmdir()
    else:
        swap_in(stage, target)
    expected = json.loads(files["expected.json"])
    return {"path": str(target), "date": date, "files": len(files), "pairs_dir": str(target / "pairs"),
            "kg_dir": str(target / "kg"), "expected": expected}


def swap_in(src: Path, dst: Path) -> None:
    """Replace `dst` (file or folder) by the already-flushed `src` with renames only."""
    old = dst.with_name(f".old-{uuid.uuid4().hex}-{dst.name}") if dst.exists() else None
    if old is not None:
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() else old.unlink()


def add_arguments(parser) -> None:
    parser.add_argument("--out", required=True, help="folder to write the drop(s) into (e.g. $RAPID_HOME/landing/demo)")
    add_config_args(parser, DemoConfig)


def main(args, home) -> dict:
    return write_demo(Path(args.out), config_from_args(DemoConfig(), args))
