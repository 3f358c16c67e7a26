"""Flask's quickstart: answers "hello <pid>" from the development server (app.run)."""

import os

from flask import Flask

app = Flask(__name__)


@app.route("/")
def hello() -> str:
    return f"hello {os.getpid()}\n"


if __name__ == "__main__":
    app.run(port=int(os.environ.get("PORT", 5000)))
