"""A small multilingual test corpus: several scripts, emoji, source code, long whitespace runs, digits."""

MULTILINGUAL = [
    "The quick brown fox jumps over the lazy dog. It's 12345 o'clock, isn't it? We've 3.14159 reasons.",
    "Le cœur a ses raisons que la raison ne connaît point. Ça coûte 42,50 € — déjà vu!",
    "Съешь же ещё этих мягких французских булок, да выпей чаю. Москва 2024 г.",
    "敏捷的棕色狐狸跳过了懒狗。我们在2024年学习机器学习，今天天气很好！",
    "いろはにほへと ちりぬるを わかよたれそ つねならむ。東京タワーは333メートルです。",
    "다람쥐 헌 쳇바퀴에 타고파. 한국어 토크나이저 테스트입니다 123.",
    "صِف خَلقَ خَودِ كَمِثلِ الشَمسِ إِذ بَزَغَت — يَحظى الضَجيعُ بِها نَجلاءَ مِعطارِ. العربية ١٢٣",
    "שפן אכל קצת גזר בטעם חסה, ודי. עברית",
    "ऋषियों को सताने वाले दुष्ट राक्षसों के राजा रावण का सर्वनाश करने वाले विष्णुवतार भगवान श्रीराम",
    "Ξεσκεπάζω την ψυχοφθόρα βδελυγμία. Ελληνικά 2024",
    "Emoji: 😀😃😄 👩‍👩‍👧‍👦 🇫🇷 ✨🔥 — and a zero-width joiner‍here.",
    "def fib(n: int) -> int:\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "for (int i = 0; i < 10; ++i) {\n\tprintf(\"%d\\n\", i * i);\n}\n// C code\n",
    "lots   of    spaces          and\t\ttabs\n\n\n\n  and newlines   \r\n\r\n trailing   ",
    "Mixed: naïve café résumé ÆØÅ æøå ß ẞ ǅ ﬁ ﬀ Ⅻ ½ ² ⁴",
    "ASCII art:  ___\n /   \\\n|  o  |\n \\___/\n",
]
