"""Word lists the generator draws realistic text from: products by category, people, places."""

from __future__ import annotations

# Each category: the nouns of its products, its typical price (GBP) and phrases for descriptions.
CATEGORIES: dict[str, dict] = {
    "Kitchen": {
        "nouns": ["Mug", "Teapot", "Cake Tin", "Tea Towel", "Jam Jar", "Measuring Jug", "Egg Cup", "Cutlery Set",
                  "Bread Bin", "Apron", "Storage Jar", "Cookie Cutter Set"],
        "price": 6.0,
        "uses": ["afternoon tea", "weekend baking", "a cosy breakfast", "serving guests"],
    },
    "Home Decor": {
        "nouns": ["Cushion Cover", "Photo Frame", "Wall Clock", "Vase", "Mirror", "Doorstop", "Wall Art Print",
                  "Trinket Box", "Coat Hanger", "Bookends", "Throw"],
        "price": 12.0,
        "uses": ["the living room", "a hallway shelf", "a bedroom corner", "a housewarming gift"],
    },
    "Lighting": {
        "nouns": ["T-Light Holder", "Lantern", "Fairy Lights", "Table Lamp", "Candle", "Night Light",
                  "Hanging Heart Light", "Lampshade", "Candle Holder"],
        "price": 8.0,
        "uses": ["long winter evenings", "a garden party", "a reading nook", "a romantic dinner"],
    },
    "Garden": {
        "nouns": ["Plant Pot", "Watering Can", "Bird Feeder", "Garden Sign", "Wind Chime", "Seed Tin",
                  "Trowel", "Herb Planter", "Garden Gloves"],
        "price": 9.0,
        "uses": ["the patio", "a sunny windowsill", "the allotment", "a balcony garden"],
    },
    "Stationery": {
        "nouns": ["Notebook", "Pencil Case", "Greeting Card", "Gift Wrap", "Sticker Sheet", "Journal",
                  "Desk Tidy", "Letter Set", "Address Book", "Postcard Set"],
        "price": 3.5,
        "uses": ["school days", "the home office", "thank-you notes", "a birthday surprise"],
    },
    "Toys": {
        "nouns": ["Spinning Top", "Skipping Rope", "Jigsaw Puzzle", "Rag Doll", "Toy Car", "Building Blocks",
                  "Paint Set", "Playing Cards", "Kite", "Soft Toy"],
        "price": 7.0,
        "uses": ["rainy afternoons", "a party bag", "the playroom", "a stocking filler"],
    },
    "Jewellery": {
        "nouns": ["Necklace", "Bracelet", "Earrings", "Ring", "Brooch", "Hair Clip", "Charm", "Jewellery Box"],
        "price": 10.0,
        "uses": ["an evening out", "everyday wear", "a thoughtful gift", "a special occasion"],
    },
    "Bags": {
        "nouns": ["Shopping Bag", "Lunch Bag", "Tote Bag", "Purse", "Wash Bag", "Jumbo Bag", "Backpack",
                  "Picnic Bag"],
        "price": 5.5,
        "uses": ["the weekly shop", "a day trip", "the commute", "a picnic in the park"],
    },
    "Party": {
        "nouns": ["Bunting", "Paper Plates", "Napkins", "Party Cups", "Balloons", "Cake Stand", "Party Hats",
                  "Paper Chain Kit", "Cake Cases"],
        "price": 3.0,
        "uses": ["a birthday party", "a garden fete", "a baby shower", "a street party"],
    },
    "Christmas": {
        "nouns": ["Bauble", "Advent Calendar", "Stocking", "Wreath", "Tree Topper", "Christmas Card Set",
                  "Snow Globe", "Hanging Decoration", "Nativity Set"],
        "price": 6.5,
        "uses": ["the Christmas tree", "festive mornings", "the mantelpiece", "a Christmas gift"],
    },
    "Bath": {
        "nouns": ["Soap Dish", "Towel", "Bath Salts", "Toothbrush Holder", "Hand Cream", "Sponge Bag",
                  "Laundry Basket", "Bath Mat"],
        "price": 7.5,
        "uses": ["a relaxing soak", "the guest bathroom", "a spa day at home", "a pampering gift"],
    },
    "Pets": {
        "nouns": ["Pet Bowl", "Dog Lead", "Cat Toy", "Pet Bed", "Treat Tin", "Pet Collar", "Grooming Brush"],
        "price": 8.5,
        "uses": ["a faithful friend", "walkies", "a new puppy", "a pampered cat"],
    },
}

# Styles are the co-purchase themes: a customer who likes Vintage mugs tends to buy Vintage lanterns.
STYLES = ["Vintage", "Rustic", "Scandi", "Retro", "Botanical", "Nautical", "Regency", "Spotty", "Woodland",
          "Art Deco"]

FINISHES = ["Red", "Blue", "Pink", "Green", "Ivory", "Black", "Pastel", "Gold", "Silver", "Enamel", "Ceramic",
            "Glass", "Wooden", "Wicker", "Tin", "Cotton", "Linen", "Zinc", "Paper", "Velvet"]

DESCRIPTION_OPENINGS = ["A charming", "A handsome", "A delightful", "A sturdy", "A beautifully made",
                        "A cheerful", "An elegant", "A practical"]
DESCRIPTION_CLOSINGS = ["Wipe clean.", "Gift boxed.", "Sold individually.", "Designed in England.",
                        "Hand finished, so each one is unique.", "Part of our best-selling range."]

FIRST_NAMES = ["james", "mary", "john", "patricia", "robert", "jennifer", "michael", "linda", "william",
               "elizabeth", "david", "barbara", "richard", "susan", "joseph", "jessica", "thomas", "sarah",
               "charles", "karen", "oliver", "amelia", "harry", "isla", "george", "ava", "noah", "emily",
               "jack", "sophia", "leo", "grace", "oscar", "lily", "archie", "freya", "alfie", "ella", "henry",
               "chloe", "sophie", "lucas", "mia", "ethan", "zara", "arthur", "poppy", "theo", "ruby", "finley"]
LAST_NAMES = ["smith", "jones", "taylor", "brown", "williams", "wilson", "johnson", "davies", "robinson",
              "wright", "thompson", "evans", "walker", "white", "roberts", "green", "hall", "wood", "jackson",
              "clarke", "patel", "khan", "lewis", "james", "phillips", "mason", "mitchell", "rose", "davis",
              "rodriguez", "cox", "alexander", "garcia", "martin", "moore", "murphy", "kelly", "baker",
              "harris", "turner", "cooper", "hill", "ward", "morris", "moss", "price", "bell", "fox", "lee",
              "owen"]
EMAIL_DOMAINS = ["gmail.com", "yahoo.co.uk", "hotmail.com", "outlook.com", "btinternet.com", "icloud.com",
                 "sky.com", "virginmedia.com", "aol.com", "protonmail.com"]

# Countries of Online Retail customers, weighted like the real data: mostly the United Kingdom.
COUNTRIES = ["United Kingdom", "Germany", "France", "EIRE", "Spain", "Netherlands", "Belgium", "Switzerland",
             "Portugal", "Australia", "Norway", "Italy"]
COUNTRY_WEIGHTS = [0.86, 0.025, 0.022, 0.02, 0.012, 0.012, 0.01, 0.008, 0.008, 0.008, 0.008, 0.007]
