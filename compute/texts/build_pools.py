"""Builds the project's description pools (general.csv, shapes.csv) from the word lists below.

Run `python -m compute.texts.build_pools` after editing a list; the CSVs are committed.
Every line is a short image description (1 to 10 words) with the properties it names.
"""
from __future__ import annotations

import csv
import itertools
import random
from pathlib import Path

HERE = Path(__file__).parent

W = {
    "colors": "red orange yellow green blue purple pink brown black white gray golden silver turquoise "
              "maroon beige crimson navy teal lavender".split(),
    "animals": ["dog", "cat", "horse", "cow", "sheep", "goat", "pig", "rabbit", "lion", "tiger", "elephant",
                "giraffe", "zebra", "bear", "panda", "monkey", "fox", "wolf", "deer", "kangaroo", "camel",
                "squirrel", "mouse", "frog", "turtle", "snake", "lizard", "fish", "shark", "dolphin", "whale",
                "octopus", "butterfly", "bee", "spider", "crab"],
    "birds": ["parrot", "owl", "eagle", "penguin", "flamingo", "pigeon", "duck", "swan", "peacock", "hummingbird",
              "crow", "seagull", "robin", "ostrich", "toucan"],
    "vehicles": ["car", "bus", "truck", "bicycle", "motorcycle", "train", "airplane", "helicopter", "boat",
                 "sailboat", "tractor", "taxi", "scooter", "van", "tram", "ship", "canoe", "rocket"],
    "clothing": ["shirt", "dress", "jacket", "hat", "scarf", "coat", "sweater", "skirt", "pair of jeans",
                 "pair of shoes", "pair of boots", "tie", "hoodie", "uniform", "kimono", "raincoat"],
    "food": ["pizza", "burger", "salad", "sushi", "cake", "bowl of soup", "plate of pasta", "sandwich", "apple",
             "banana", "strawberry", "loaf of bread", "cup of coffee", "ice cream", "donut", "taco",
             "bowl of rice", "steak", "pie", "orange juice", "cheese", "chocolate", "cookie", "noodles"],
    "objects": ["chair", "table", "lamp", "clock", "book", "phone", "laptop", "guitar", "piano", "umbrella",
                "bottle", "cup", "vase", "key", "camera", "backpack", "teapot", "candle", "mirror", "bed",
                "sofa", "television", "kite", "ball", "balloon", "door", "window", "bench", "basket", "bucket"],
    "materials": ["wood", "metal", "glass", "plastic", "stone", "marble", "leather", "paper", "concrete",
                  "ceramic", "wool", "silk", "cotton", "steel", "bamboo", "clay"],
    "textures": ["rough", "smooth", "fluffy", "furry", "shiny", "glossy", "matte", "wrinkled", "bumpy", "grainy",
                 "soft", "cracked", "rusty", "velvety", "woven", "scaly"],
    "patterns": ["striped", "polka dot", "checkered", "plaid", "floral", "zigzag", "paisley", "camouflage",
                 "herringbone", "houndstooth", "spotted", "geometric", "tiled", "hexagonal", "spiral",
                 "wavy", "dotted", "gridded"],
    "shapes": ["circle", "square", "triangle", "rectangle", "star", "heart", "hexagon", "oval", "diamond",
               "cross", "arrow", "crescent", "cube", "sphere", "cone", "pyramid"],
    "emotions": ["happy", "sad", "angry", "surprised", "scared", "calm", "excited", "bored", "joyful",
                 "worried", "proud", "shy", "confused", "tired", "laughing", "crying", "smiling", "frowning"],
    "people": ["man", "woman", "child", "baby", "old man", "old woman", "teenager", "family", "crowd",
               "couple", "athlete", "chef", "doctor", "soldier", "musician", "dancer", "farmer", "student"],
    "body": ["face", "hand", "eye", "foot", "ear", "mouth", "nose", "arm", "leg", "hair", "beard", "smile",
             "fingers", "shoulder"],
    "weather": ["rain", "snow", "fog", "storm", "sunshine", "clouds", "wind", "hail", "lightning", "rainbow",
                "drizzle", "heat wave", "frost", "blizzard", "mist"],
    "lighting": ["sunrise", "sunset", "night", "noon", "dusk", "dawn", "golden hour", "midnight", "twilight",
                 "moonlight", "neon light", "candlelight", "backlight", "harsh shadows", "soft light"],
    "photography": ["black and white photo", "close-up photo", "aerial photo", "long exposure photo",
                    "blurry photo", "macro photo", "panoramic photo", "portrait photo", "selfie",
                    "underwater photo", "infrared photo", "film photo", "fisheye photo", "overexposed photo",
                    "tilt-shift photo", "studio photo", "snapshot", "drone shot", "low angle shot", "high angle shot"],
    "art": ["oil painting", "watercolor painting", "pencil sketch", "charcoal drawing", "cartoon", "anime drawing",
            "pixel art", "mosaic", "graffiti", "woodcut print", "pop art", "impressionist painting",
            "cubist painting", "comic strip", "3d render", "clay sculpture", "stained glass", "ink drawing",
            "abstract painting", "vector illustration"],
    "scenes": ["beach", "forest", "desert", "mountain", "city street", "kitchen", "bedroom", "office",
               "classroom", "park", "farm", "river", "lake", "jungle", "harbor", "market", "stadium", "library",
               "subway station", "garden", "highway", "cave", "meadow", "waterfall", "snowy field", "living room",
               "restaurant", "airport", "bridge", "playground"],
    "locations": ["Paris", "Tokyo", "New York", "London", "Rome", "Cairo", "Sydney", "Rio de Janeiro", "Istanbul",
                  "Moscow", "Beijing", "Mumbai", "Mexico City", "Venice", "Kyoto", "Dubai", "Iceland", "Norway",
                  "Kenya", "Peru", "Morocco", "Greece", "Scotland", "Alaska", "the Sahara", "the Alps",
                  "the Amazon", "Antarctica", "Hawaii", "Bali"],
    "landmarks": ["the Eiffel Tower", "the Colosseum", "the pyramids of Giza", "the Statue of Liberty",
                  "Big Ben", "the Taj Mahal", "the Great Wall", "the Golden Gate Bridge", "Mount Fuji",
                  "the Sydney Opera House", "Machu Picchu", "Stonehenge", "the Leaning Tower of Pisa",
                  "Times Square", "the Acropolis"],
    "letters": ["the letter A", "the letter B", "the letter K", "the letter M", "the letter Q", "the letter S",
                "the letter X", "the letter Z", "a handwritten word", "a street sign with text", "a page of text",
                "a neon sign with words", "a logo with letters", "a poster with a headline", "a license plate",
                "a newspaper headline", "a chalkboard with writing", "a typewritten letter", "calligraphy",
                "graffiti lettering", "a book cover title", "a shop sign", "an alphabet chart", "a word in bold"],
    "numbers": ["the number one", "the number two", "the number three", "the number seven", "the number ten",
                "a clock face with numbers", "a calculator", "a price tag", "a scoreboard", "a calendar page",
                "a number on a jersey", "a house number", "dice", "a speed limit sign", "a countdown timer",
                "a page of equations", "a barcode", "a lottery ticket"],
    "plants": ["tree", "rose", "sunflower", "cactus", "palm tree", "tulip", "fern", "oak tree", "pine tree",
               "bamboo grove", "orchid", "daisy", "moss", "ivy", "bonsai tree", "lily"],
}
COUNTS = ["two", "three", "four", "five", "six", "a dozen", "many", "a pair of", "a single", "several"]


def article(word: str) -> str:
    return "an" if word[0].lower() in "aeiou" else "a"


def general_pool(seed: int = 0) -> list[tuple[str, list[str]]]:
    rng = random.Random(seed)
    rows: dict[str, list[str]] = {}

    def add(text: str, *tags: str) -> None:
        text = " ".join(text.split())
        if 1 <= len(text.split()) <= 10 and text not in rows:
            rows[text] = sorted(set(tags))

    # single-property descriptions
    for prop, words in W.items():
        tag = {"body": "people", "landmarks": "locations"}.get(prop, prop)
        for w in words:
            if prop in ("colors",):
                add(f"the color {w}", tag)
                add(f"something {w}", tag)
            elif prop in ("textures",):
                add(f"a {w} surface", tag)
                add(f"{w} texture", tag)
            elif prop in ("patterns",):
                add(f"a {w} pattern", tag)
            elif prop in ("materials",):
                add(f"made of {w}", tag)
                add(f"a {w} surface", tag, "textures")
            elif prop in ("emotions",):
                add(f"a {w} face", tag, "people")
                add(f"a {w} expression", tag)
            elif prop in ("weather", "lighting"):
                add(w, tag)
                add(f"a scene in the {w}" if prop == "weather" else f"a scene at {w}", tag)
            elif prop in ("photography", "art", "letters", "numbers"):
                add(w if w.split()[0] in ("a", "an", "the", "calligraphy", "dice") else f"{article(w)} {w}", tag)
            elif prop == "locations" or prop == "landmarks":
                add(w, tag)
                add(f"a photo taken in {w}" if prop == "locations" else f"a view of {w}", tag)
            elif prop == "body":
                add(f"a close-up of a {w}", tag)
            elif prop == "scenes":
                add(f"{article(w)} {w}", tag)
                add(f"a view of {article(w)} {w}", tag)
            else:
                add(f"{article(w)} {w}", tag)

    # two-property combinations
    colored = W["vehicles"] + W["clothing"] + W["objects"] + W["shapes"] + W["birds"] + W["plants"]
    for c, thing in itertools.product(W["colors"], colored):
        prop = next(p for p in ("vehicles", "clothing", "objects", "shapes", "birds", "plants") if thing in W[p])
        if rng.random() < 0.3:
            add(f"{article(c)} {c} {thing}", "colors", prop)
    for pat, thing in itertools.product(W["patterns"], W["clothing"] + W["objects"][:12]):
        if rng.random() < 0.35:
            add(f"{article(pat)} {pat} {thing}", "patterns", "clothing" if thing in W["clothing"] else "objects")
    for mat, thing in itertools.product(W["materials"], W["objects"]):
        if rng.random() < 0.3:
            add(f"{article(mat)} {mat} {thing}", "materials", "objects")
    for tex, thing in itertools.product(W["textures"], W["animals"] + W["objects"]):
        if rng.random() < 0.2:
            add(f"{article(tex)} {tex} {thing}", "textures", "animals" if thing in W["animals"] else "objects")
    for emo, who in itertools.product(W["emotions"], W["people"]):
        if rng.random() < 0.3:
            add(f"{article(emo)} {emo} {who}", "emotions", "people")
    for animal, scene in itertools.product(W["animals"] + W["birds"], W["scenes"]):
        if rng.random() < 0.2:
            prop = "animals" if animal in W["animals"] else "birds"
            add(f"{article(animal)} {animal} in {article(scene)} {scene}", prop, "scenes")
    for place, light in itertools.product(W["locations"] + W["landmarks"], W["lighting"]):
        if rng.random() < 0.12:
            add(f"{place} at {light}", "locations", "lighting")
    for place, weather in itertools.product(W["locations"], W["weather"]):
        if rng.random() < 0.12:
            add(f"{place} in the {weather}", "locations", "weather")
    for style, subject in itertools.product(W["art"], W["animals"] + W["people"] + W["scenes"]):
        if rng.random() < 0.1:
            prop = "animals" if subject in W["animals"] else "people" if subject in W["people"] else "scenes"
            add(f"{article(style)} {style} of {article(subject)} {subject}", "art", prop)
    for style, subject in itertools.product(W["photography"], W["animals"] + W["food"] + W["scenes"]):
        if rng.random() < 0.08:
            prop = "animals" if subject in W["animals"] else "food" if subject in W["food"] else "scenes"
            add(f"{article(style)} {style} of {article(subject)} {subject}", "photography", prop)
    for n, thing in itertools.product(COUNTS, W["animals"] + W["food"] + W["vehicles"]):
        if rng.random() < 0.12:
            prop = "animals" if thing in W["animals"] else "food" if thing in W["food"] else "vehicles"
            plural = thing if n in ("a single", "a pair of") else (thing + ("es" if thing.endswith(("s", "sh", "ch", "x")) else "s"))
            add(f"{n} {plural}", "numbers", prop)
    for food, scene in itertools.product(W["food"], ["table", "plate", "kitchen counter", "market stall", "picnic blanket"]):
        if rng.random() < 0.25:
            add(f"{article(food)} {food} on {article(scene)} {scene}", "food", "scenes")
    for vehicle, weather in itertools.product(W["vehicles"], W["weather"]):
        if rng.random() < 0.15:
            add(f"{article(vehicle)} {vehicle} in the {weather}", "vehicles", "weather")
    for who, cloth in itertools.product(W["people"], W["clothing"]):
        if rng.random() < 0.12:
            add(f"{article(who)} {who} wearing {article(cloth) if not cloth.startswith('pair') else 'a'} {cloth}", "people", "clothing")
    for shape, mat in itertools.product(W["shapes"], W["materials"]):
        if rng.random() < 0.15:
            add(f"{article(shape)} {shape} made of {mat}", "shapes", "materials")
    words = ["STOP", "OPEN", "EXIT", "SALE", "HELLO", "LOVE", "COFFEE", "HOTEL", "TAXI", "POLICE", "BAKERY", "WELCOME"]
    for letter in "ABCDEFGHIJKLMNOPQRSTUVWXYZ":
        add(f"the letter {letter}", "letters")
        add(f"a large letter {letter} on a wall", "letters")
    for word in words:
        add(f"a sign that says {word}", "letters")
        add(f"the word {word}", "letters")
    for letter, c in itertools.product("ABCDEFGHIJKLMNOPQRSTUVWXYZ", W["colors"]):
        if rng.random() < 0.12:
            add(f"the letter {letter} in {c}", "letters", "colors")
    for n in range(11, 100, 3):
        add(f"the number {n}", "numbers")
    return list(rows.items())


def shapes_pool() -> list[tuple[str, list[str]]]:
    from ..shapes.world import ATTRIBUTES
    rows: dict[str, list[str]] = {}
    phrasing = {
        "color": ["{v}", "a {v} object", "something {v}", "the color {v}", "a {v} shape"],
        "shape": ["a {v}", "a {v} shape", "an object shaped like a {v}", "the {v}"],
        "pattern": ["a {v} object", "a {v} shape", "{v} texture"],
        "size": ["a {v} object", "a {v} shape", "something {v}"],
        "position": ["in the {v}", "an object in the {v}", "something at the {v}", "the {v} of the image"],
        "background": ["{v}", "on {v}", "a scene on {v}", "a {v} background"],
    }
    for attr, values in ATTRIBUTES.items():
        for v in values:
            for tpl in phrasing[attr]:
                rows.setdefault(tpl.format(v=v).replace("a o", "an o"), [attr])
    for extra in ("stripes", "dots", "a plain single-colour object"):
        rows.setdefault(extra, ["pattern"])
    for extra in ("a picture", "an image", "a photo", "a scene", "an object"):
        rows.setdefault(extra, [])
    return list(rows.items())


def write(rows: list[tuple[str, list[str]]], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "tags"])
        for text, tags in rows:
            w.writerow([text, ";".join(tags)])


if __name__ == "__main__":
    write(general_pool(), HERE / "general.csv")
    write(shapes_pool(), HERE / "shapes.csv")
