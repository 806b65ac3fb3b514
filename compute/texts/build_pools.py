"""Builds the project's description pools (general.csv, shapes.csv) from the word lists below.

Run `python -m compute.texts.build_pools` after editing a list; the CSVs are committed.
Every line of `general` is a short natural image description (1 to 9 words) tagged with the
properties it names. Grammar is explicit, not guessed: every noun carries its plural (or is a
mass noun that is never counted), counts take plurals ("two foxes", "a single fox"), articles
follow the sound of the next word (`article`), and tests/test_textspan.py checks these rules.
"""
from __future__ import annotations

import csv
import itertools
import random
from pathlib import Path

from compute.shapes.world import ATTRIBUTES

HERE = Path(__file__).parent
MAX_WORDS = 9

IRREGULAR = {"mouse": "mice", "goose": "geese", "sheep": "sheep", "fish": "fish", "deer": "deer", "man": "men",
             "woman": "women", "child": "children", "person": "people", "wolf": "wolves", "knife": "knives",
             "leaf": "leaves", "shelf": "shelves", "loaf of bread": "loaves of bread", "cactus": "cacti",
             "tomato": "tomatoes", "potato": "potatoes", "foot": "feet", "tooth": "teeth", "old man": "old men",
             "old woman": "old women", "policeman": "policemen", "ox": "oxen", "octopus": "octopuses",
             "piano": "pianos", "kangaroo": "kangaroos", "taxi": "taxis", "sushi roll": "sushi rolls"}
# words that start with a vowel letter but a consonant sound, and the reverse
CONSONANT_SOUND = ("uni", "use", "usu", "euro", "one", "ukulele", "utensil")
VOWEL_SOUND = ("hour", "honest", "heir", "8", "11", "18", "x-ray")
MASS = {"ice cream", "rice", "noodles", "cheese", "chocolate", "orange juice", "moss", "ivy", "bread", "soup",
        "pasta", "salad", "steak", "coffee", "tea"}


def plural(noun: str) -> str:
    if noun in IRREGULAR:
        return IRREGULAR[noun]
    head, _, last = noun.rpartition(" ")
    lead = head + " " if head else ""
    if last in IRREGULAR:
        return lead + IRREGULAR[last]
    if last.endswith(("s", "sh", "ch", "x", "z")):
        return lead + last + "es"
    if last.endswith("y") and last[-2:-1] not in tuple("aeiou"):
        return lead + last[:-1] + "ies"
    return lead + last + "s"


def article(phrase: str) -> str:
    """'a' or 'an' for the phrase that follows, by its first sound."""
    w = phrase.lower()
    if w.startswith(VOWEL_SOUND):
        return "an"
    if w.startswith(CONSONANT_SOUND):
        return "a"
    return "an" if w[:1] in "aeiou" else "a"


def a(phrase: str) -> str:
    return f"{article(phrase)} {phrase}"


W = {
    "colors": "red orange yellow green blue purple pink brown black white gray golden silver turquoise "
              "maroon beige crimson navy teal lavender".split(),
    "animals": ["dog", "cat", "horse", "cow", "sheep", "goat", "pig", "rabbit", "lion", "tiger", "elephant",
                "giraffe", "zebra", "bear", "panda", "monkey", "fox", "wolf", "deer", "kangaroo", "camel",
                "squirrel", "mouse", "frog", "turtle", "snake", "lizard", "fish", "shark", "dolphin", "whale",
                "octopus", "butterfly", "bee", "spider", "crab", "puppy", "kitten"],
    "birds": ["parrot", "owl", "eagle", "penguin", "flamingo", "pigeon", "duck", "swan", "peacock", "hummingbird",
              "crow", "seagull", "robin", "ostrich", "toucan", "goose", "sparrow", "woodpecker"],
    "vehicles": ["car", "bus", "truck", "bicycle", "motorcycle", "train", "airplane", "helicopter", "boat",
                 "sailboat", "tractor", "taxi", "scooter", "van", "tram", "ship", "canoe", "rocket", "fire truck",
                 "ambulance", "school bus", "race car"],
    "clothing": ["shirt", "dress", "jacket", "hat", "scarf", "coat", "sweater", "skirt", "tie", "hoodie",
                 "uniform", "kimono", "raincoat", "glove", "sock", "boot", "sneaker", "cap", "suit", "apron"],
    "food": ["pizza", "burger", "sushi roll", "cake", "sandwich", "apple", "banana", "strawberry", "loaf of bread",
             "donut", "taco", "pie", "cookie", "cupcake", "tomato", "potato", "lemon", "watermelon", "pancake",
             "croissant", "egg", "carrot", "pear", "peach"],
    "dishes": ["ice cream", "rice", "noodles", "cheese", "chocolate", "orange juice", "soup", "pasta", "salad",
               "steak", "coffee", "tea"],
    "objects": ["chair", "table", "lamp", "clock", "book", "phone", "laptop", "guitar", "piano", "umbrella",
                "bottle", "cup", "vase", "key", "camera", "backpack", "teapot", "candle", "mirror", "bed",
                "sofa", "television", "kite", "ball", "balloon", "door", "window", "bench", "basket", "bucket"],
    "materials": ["wood", "metal", "glass", "plastic", "stone", "marble", "leather", "paper", "concrete",
                  "ceramic", "wool", "silk", "cotton", "steel", "bamboo", "clay", "brick", "gold"],
    "textures": ["rough", "smooth", "fluffy", "furry", "shiny", "glossy", "matte", "wrinkled", "bumpy", "grainy",
                 "soft", "cracked", "rusty", "velvety", "woven", "scaly", "sticky", "polished"],
    "patterns": ["striped", "polka dot", "checkered", "plaid", "floral", "zigzag", "paisley", "camouflage",
                 "herringbone", "houndstooth", "spotted", "geometric", "tiled", "hexagonal", "spiral",
                 "wavy", "dotted", "gridded"],
    "shapes": ["circle", "square", "triangle", "rectangle", "star", "heart", "hexagon", "oval", "diamond",
               "cross", "arrow", "crescent", "cube", "sphere", "cone", "pyramid"],
    "emotions": ["happy", "sad", "angry", "surprised", "scared", "calm", "excited", "bored", "joyful",
                 "worried", "proud", "shy", "confused", "tired", "cheerful", "nervous", "lonely", "relaxed"],
    "people": ["man", "woman", "child", "baby", "old man", "old woman", "teenager", "girl", "boy",
               "athlete", "chef", "doctor", "soldier", "musician", "dancer", "farmer", "student", "nurse"],
    "weather": ["rain", "snow", "fog", "a storm", "sunshine", "heavy clouds", "strong wind", "hail", "lightning",
                "a rainbow", "drizzle", "a heat wave", "frost", "a blizzard", "mist"],
    "lighting": ["sunrise", "sunset", "night", "noon", "dusk", "dawn", "golden hour", "midnight", "twilight",
                 "moonlight", "neon light", "candlelight", "backlight", "harsh shadows", "soft light", "lamplight"],
    "photography": ["black and white photo", "close-up photo", "aerial photo", "long exposure photo",
                    "blurry photo", "macro photo", "panoramic photo", "portrait photo", "selfie",
                    "underwater photo", "infrared photo", "film photo", "fisheye photo", "overexposed photo",
                    "tilt-shift photo", "studio photo", "snapshot", "drone shot", "low angle shot", "high angle shot"],
    "art": ["oil painting", "watercolor painting", "pencil sketch", "charcoal drawing", "cartoon", "anime drawing",
            "pixel art image", "mosaic", "graffiti mural", "woodcut print", "pop art poster", "impressionist painting",
            "cubist painting", "comic strip", "3d render", "clay sculpture", "stained glass window", "ink drawing",
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
    "plants": ["tree", "rose", "sunflower", "cactus", "palm tree", "tulip", "fern", "oak tree", "pine tree",
               "orchid", "daisy", "bonsai tree", "lily", "maple leaf", "mushroom", "dandelion"],
    "actions": ["running", "jumping", "swimming", "sleeping", "eating", "dancing", "climbing", "flying",
                "reading", "cooking", "singing", "walking", "sitting", "playing", "laughing", "crying"],
}
ON = {"beach", "farm", "mountain", "highway", "bridge", "playground", "snowy field", "river", "lake"}
AT = {"stadium", "airport", "market", "harbor", "subway station", "restaurant"}
TIMES_OF_DAY = ["sunrise", "sunset", "night", "dusk", "dawn", "golden hour", "midnight", "twilight"]
IN_THE = ["rain", "snow", "fog", "sunshine", "hail", "drizzle", "mist"]     # "in the ..." reads naturally


def at_scene(scene: str) -> str:
    """The preposition and article a scene takes: 'on a beach', 'at an airport', 'in a kitchen'."""
    return f"{'on' if scene in ON else 'at' if scene in AT else 'in'} {a(scene)}"


COUNTS = ["two", "three", "four", "five", "several", "many", "a few", "a dozen", "a group of", "a row of"]
SIGN_WORDS = ["STOP", "OPEN", "EXIT", "SALE", "HELLO", "LOVE", "COFFEE", "HOTEL", "TAXI", "POLICE", "BAKERY",
              "WELCOME", "CLOSED", "DANGER", "NO PARKING", "FOR RENT"]
NUMBER_WORDS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
# which actions each kind of subject can do (so no fish is reading)
CAN = {"people": ["running", "jumping", "swimming", "sleeping", "eating", "dancing", "climbing", "reading",
                  "cooking", "singing", "walking", "sitting", "playing", "laughing", "crying"],
       "animals": ["running", "jumping", "sleeping", "eating", "playing", "sitting", "walking"],
       "birds": ["flying", "sitting", "eating", "sleeping", "walking"]}
SWIMMERS = {"fish", "shark", "dolphin", "whale", "octopus", "crab", "turtle", "frog"}
FLYERS = {"butterfly", "bee"}


def general_pool(seed: int = 0) -> list[tuple[str, list[str]]]:
    rng = random.Random(seed)
    rows: dict[str, list[str]] = {}

    def add(text: str, *tags: str) -> None:
        text = " ".join(text.split())
        if 1 <= len(text.split()) <= MAX_WORDS and text not in rows:
            rows[text] = sorted(set(tags))

    def some(items, share):
        return [x for x in items if rng.random() < share]

    # one property
    for c in W["colors"]:
        for t in (f"the color {c}", f"something {c}", f"{a(c)} background", f"{c} paint", f"a splash of {c}"):
            add(t, "colors")
    for x in W["animals"]:
        for t in (a(x), f"a close-up of {a(x)}", f"a wild {x}", f"a photo of {a(x)}"):
            add(t, "animals")
    for x in W["birds"]:
        for t in (a(x), f"{a(x)} on a branch", f"a photo of {a(x)}", f"{a(x)} in flight", f"a flock of {plural(x)}"):
            add(t, "birds")
    for x in W["vehicles"]:
        for t in (a(x), f"a parked {x}", f"{a(x)} on the road" if x not in ("boat", "sailboat", "ship", "canoe", "airplane",
                  "helicopter", "rocket", "train", "tram") else f"{a(x)} in motion", f"an old {x}"):
            add(t, "vehicles")
    for x in W["clothing"]:
        for t in (a(x), f"a woolen {x}", f"a folded {x}", f"a person in {a(x)}"):
            add(t, "clothing", *(["people"] if "person" in t else []))
    for x in W["food"]:
        for t in (a(x), f"a plate with {a(x)}", f"fresh {plural(x)}", f"a sliced {x}"):
            add(t, "food")
    for x in W["dishes"]:
        for t in (x, f"a bowl of {x}", f"homemade {x}"):
            add(t, "food")
    for x in W["objects"]:
        for t in (a(x), f"an old {x}", f"a broken {x}"):
            add(t, "objects")
    for x in W["materials"]:
        for t in (f"made of {x}", f"{a(x)} surface", f"a close-up of {x}", f"a wall of {x}"):
            add(t, "materials", *(["textures"] if "surface" in t else []))
    for x in W["textures"]:
        for t in (f"{a(x)} surface", f"{x} texture", f"something {x}", f"{a(x)} fabric"):
            add(t, "textures")
    for x in W["patterns"]:
        for t in (f"{a(x)} pattern", f"{x} fabric", f"{a(x)} wallpaper", f"{a(x)} print"):
            add(t, "patterns")
    for x in W["shapes"]:
        for t in (a(x), f"{a(x)} shape", f"the outline of {a(x)}", f"a drawing of {a(x)}", f"{a(x)} symbol"):
            add(t, "shapes")
    for x in W["emotions"]:
        for t in (f"{a(x)} face", f"{a(x)} expression", f"someone looking {x}", f"feeling {x}"):
            add(t, "emotions", *(["people"] if t.endswith("face") or t.startswith("someone") else []))
    for x in W["people"]:
        for t in (a(x), f"a portrait of {a(x)}", f"{a(x)} outdoors", f"a smiling {x}"):
            add(t, "people", *(["emotions"] if "smiling" in t else []))
    for x in W["weather"]:
        bare = x.split(" ", 1)[1] if x.startswith(("a ", "an ")) else x
        for t in (x, f"a street in {x if not x.startswith(('a ', 'an ')) else 'the ' + bare}", f"a landscape in {x if not x.startswith(('a ', 'an ')) else 'the ' + bare}",
                  f"a photo of {x}", f"{x} over the hills"):
            add(t, "weather")
    for x in W["lighting"]:
        for t in (x, f"a city at {x}", f"a landscape at {x}", f"lit by {x}" if x.endswith("light") else f"a sky at {x}"):
            add(t, "lighting")
    for x in W["photography"]:
        for t in (a(x), f"{a(x)} of a street", f"{a(x)} of a face", f"{a(x)} of a dog"):
            add(t, "photography", *(["people"] if "face" in t else ["animals"] if "dog" in t else ["scenes"] if "street" in t else []))
    for x in W["art"]:
        for t in (a(x), f"{a(x)} of a city", f"{a(x)} of a flower", f"{a(x)} of a cat"):
            add(t, "art", *(["animals"] if "cat" in t else ["plants"] if "flower" in t else ["scenes"] if "city" in t else []))
    for x in W["scenes"]:
        for t in (a(x), f"a view of {a(x)}", f"an empty {x}", f"a crowded {x}" if x not in ("desert", "cave", "meadow",
                  "waterfall", "snowy field", "river", "lake", "mountain", "forest", "jungle") else f"a quiet {x}"):
            add(t, "scenes")
    for x in W["locations"]:
        for t in (x, f"a photo taken in {x}", f"a street in {x}" if x[0].isupper() and " the " not in f" {x} " and x not in
                  ("Iceland", "Antarctica", "Alaska") else f"a trip to {x}", f"a postcard from {x}"):
            add(t, "locations")
    for x in W["landmarks"]:
        for t in (x, f"a view of {x}", f"tourists at {x}", f"a photo of {x}"):
            add(t, "locations")
    for x in W["plants"]:
        for t in (a(x), f"a field of {plural(x)}", f"a potted {x}" if x not in ("oak tree", "pine tree", "palm tree", "tree")
                  else f"a tall {x}", f"a close-up of {a(x)}"):
            add(t, "plants")
    for letter in "ABCDEFGHIJKLMNOPQRSTUVWXYZ":
        add(f"the letter {letter}", "letters")
        add(f"a large letter {letter} on a wall", "letters")
    for word in SIGN_WORDS:
        add(f"a sign that says {word}", "letters")
        add(f"the word {word}", "letters")
        add(f"a neon sign reading {word}", "letters")
    for t in ("a handwritten note", "a page of text", "a newspaper headline", "a chalkboard with writing",
              "a typewritten letter", "calligraphy", "graffiti lettering", "a book cover title", "a shop sign",
              "an alphabet chart", "a word in bold letters", "a poster with a headline", "a license plate"):
        add(t, "letters")
    for n in NUMBER_WORDS:
        add(f"the number {n}", "numbers")
    for n in range(11, 100, 4):
        add(f"the number {n}", "numbers")
        add(f"a jersey with the number {n}", "numbers", "clothing")
    for t in ("a clock face with numbers", "a calculator", "a price tag", "a scoreboard", "a calendar page",
              "a house number", "a pair of dice", "a speed limit sign", "a countdown timer", "a page of equations",
              "a barcode", "a lottery ticket", "a digital display of numbers"):
        add(t, "numbers")
    for who in ("a person", "a dog"):
        for act in W["actions"]:
            if act in CAN["people" if who == "a person" else "animals"]:
                add(f"{who} {act}", "actions", "people" if who == "a person" else "animals")

    # two properties
    colored = [(x, p) for p in ("vehicles", "clothing", "objects", "shapes", "birds", "plants") for x in W[p]]
    for c, (thing, prop) in itertools.product(W["colors"], colored):
        if rng.random() < 0.3:
            add(f"{a(c)} {thing}", "colors", prop)
    for pat, thing in itertools.product(W["patterns"], W["clothing"] + W["objects"][:12]):
        if rng.random() < 0.3:
            add(f"{a(pat)} {thing}", "patterns", "clothing" if thing in W["clothing"] else "objects")
    for mat, thing in itertools.product(W["materials"], W["objects"]):
        if rng.random() < 0.25:
            add(f"{a(mat)} {thing}", "materials", "objects")
    for tex, thing in itertools.product(W["textures"], W["animals"] + W["objects"]):
        if rng.random() < 0.12:
            add(f"{a(tex)} {thing}", "textures", "animals" if thing in W["animals"] else "objects")
    for emo, who in itertools.product(W["emotions"], W["people"]):
        if rng.random() < 0.3:
            add(f"{a(emo)} {who}", "emotions", "people")
    for animal, scene in itertools.product(W["animals"] + W["birds"], W["scenes"]):
        if rng.random() < 0.1:
            add(f"{a(animal)} {at_scene(scene)}", "animals" if animal in W["animals"] else "birds", "scenes")
    for place, light in itertools.product(W["locations"] + W["landmarks"], TIMES_OF_DAY):
        if rng.random() < 0.1:
            add(f"{place} at {light}", "locations", "lighting")
    for place, weather in itertools.product(W["locations"], IN_THE):
        if rng.random() < 0.15:
            add(f"{place} in the {weather}", "locations", "weather")
    for style, subject in itertools.product(W["art"], W["animals"] + W["people"] + W["scenes"]):
        if rng.random() < 0.08:
            prop = "animals" if subject in W["animals"] else "people" if subject in W["people"] else "scenes"
            add(f"{a(style)} of {a(subject)}", "art", prop)
    for style, subject in itertools.product(W["photography"], W["animals"] + W["food"] + W["scenes"]):
        if rng.random() < 0.06:
            prop = "animals" if subject in W["animals"] else "food" if subject in W["food"] else "scenes"
            add(f"{a(style)} of {a(subject)}", "photography", prop)
    countable = [(x, p) for p in ("animals", "birds", "food", "vehicles", "objects", "people", "plants") for x in W[p]]
    for n, (thing, prop) in itertools.product(COUNTS, countable):
        if rng.random() < 0.1:
            add(f"{n} {plural(thing)}", "numbers", prop)
    for thing, prop in countable:
        if rng.random() < 0.2:
            add(f"a single {thing}", "numbers", prop)
    for food, place in itertools.product(W["food"] + W["dishes"], ["table", "plate", "kitchen counter", "market stall",
                                                                    "picnic blanket"]):
        if rng.random() < 0.2:
            add(f"{a(food) if food not in MASS else food} on {a(place)}", "food", "scenes")
    for vehicle, weather in itertools.product(W["vehicles"], IN_THE):
        if rng.random() < 0.2:
            add(f"{a(vehicle)} in the {weather}", "vehicles", "weather")
    for who, cloth in itertools.product(W["people"], W["clothing"]):
        if rng.random() < 0.12:
            add(f"{a(who)} wearing {a(cloth)}", "people", "clothing")
    for shape, mat in itertools.product(W["shapes"], W["materials"]):
        if rng.random() < 0.12:
            add(f"{a(shape)} made of {mat}", "shapes", "materials")
    for letter, c in itertools.product("ABCDEFGHIJKLMNOPQRSTUVWXYZ", W["colors"]):
        if rng.random() < 0.1:
            add(f"the letter {letter} in {c}", "letters", "colors")
    for who, act in itertools.product(W["people"], CAN["people"]):
        if rng.random() < 0.25:
            add(f"{a(who)} {act}", "people", "actions")
    for animal, act in itertools.product(W["animals"], CAN["animals"] + ["swimming", "flying"]):
        ok = (act == "swimming") == (animal in SWIMMERS) if act == "swimming" else (
            animal in FLYERS if act == "flying" else animal not in SWIMMERS | FLYERS)
        if ok and rng.random() < 0.35:
            add(f"{a(animal)} {act}", "animals", "actions")
    for bird, act in itertools.product(W["birds"], CAN["birds"]):
        if rng.random() < 0.35:
            add(f"{a(bird)} {act}", "birds", "actions")
    for who, act in itertools.product(("a child", "a man", "a woman", "a dog"), CAN["people"]):
        for scene in some(W["scenes"], 0.05):
            if who != "a dog" or act in CAN["animals"]:
                add(f"{who} {act} {at_scene(scene)}", "people" if who != "a dog" else "animals", "actions", "scenes")
    return list(rows.items())


def shapes_pool() -> list[tuple[str, list[str]]]:
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
