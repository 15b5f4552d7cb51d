"""A small inventory system for a bookshop: books, stock, orders and a simple report."""
import csv
import json
from dataclasses import dataclass, field
from datetime import date


@dataclass
class Book:
    isbn: str
    title: str
    author: str
    price: float
    year: int = 0
    tags: list = field(default_factory=list)

    def label(self):
        return f"{self.title} by {self.author} ({self.year})"


@dataclass
class OrderLine:
    isbn: str
    quantity: int
    unit_price: float

    def total(self):
        return self.quantity * self.unit_price


class Inventory:
    def __init__(self):
        self.books = {}
        self.stock = {}
        self.history = []

    def add_book(self, book, count=0):
        if book.isbn in self.books:
            raise ValueError(f"duplicate isbn: {book.isbn}")
        self.books[book.isbn] = book
        self.stock[book.isbn] = count

    def receive(self, isbn, count):
        if isbn not in self.books:
            raise KeyError(isbn)
        if count <= 0:
            raise ValueError("count must be positive")
        self.stock[isbn] += count
        self.history.append(("receive", isbn, count, date.today()))

    def sell(self, isbn, count=1):
        available = self.stock.get(isbn, 0)
        if count > available:
            return False
        self.stock[isbn] = available - count
        self.history.append(("sell", isbn, count, date.today()))
        return True

    def find(self, text):
        text = text.lower()
        result = []
        for book in self.books.values():
            if text in book.title.lower() or text in book.author.lower():
                result.append(book)
        return sorted(result, key=lambda b: (b.author, b.year))

    def low_stock(self, limit=2):
        return [self.books[isbn] for isbn, n in self.stock.items() if n <= limit]

    def value(self):
        total = 0.0
        for isbn, count in self.stock.items():
            total += count * self.books[isbn].price
        return round(total, 2)


def place_order(inventory, lines):
    """Sell every line of an order, or nothing if one line cannot be filled."""
    for line in lines:
        if inventory.stock.get(line.isbn, 0) < line.quantity:
            return None
    for line in lines:
        inventory.sell(line.isbn, line.quantity)
    return sum(line.total() for line in lines)


def load_books(path):
    books = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        for row in reader:
            tags = [t.strip() for t in row.get("tags", "").split(";") if t.strip()]
            books.append(Book(row["isbn"], row["title"], row["author"],
                              float(row["price"]), int(row.get("year") or 0), tags))
    return books


def save_report(inventory, path):
    report = {
        "books": len(inventory.books),
        "copies": sum(inventory.stock.values()),
        "value": inventory.value(),
        "low_stock": [b.label() for b in inventory.low_stock()],
        "by_author": {},
    }
    for book in inventory.books.values():
        report["by_author"].setdefault(book.author, []).append(book.title)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2, sort_keys=True)
    return report


def count_tags(books):
    counts = {}
    for book in books:
        for tag in book.tags:
            counts[tag] = counts.get(tag, 0) + 1
    return sorted(counts.items(), key=lambda item: (-item[1], item[0]))


def monthly_sales(history):
    months = {}
    for kind, isbn, count, day in history:
        if kind != "sell":
            continue
        key = (day.year, day.month)
        months[key] = months.get(key, 0) + count
    return [(f"{y}-{m:02d}", n) for (y, m), n in sorted(months.items())]


def main():
    inventory = Inventory()
    inventory.add_book(Book("111", "The Tide Tables", "A. Marsh", 12.5, 1998, ["sea", "reference"]), 4)
    inventory.add_book(Book("222", "Letters Home", "J. Reed", 9.0, 1921, ["letters"]), 1)
    inventory.add_book(Book("333", "Counting the Stars", "M. Hale", 15.0, 2004, ["stars", "science"]), 0)
    inventory.receive("333", 6)
    order = [OrderLine("111", 2, 12.5), OrderLine("333", 1, 15.0)]
    total = place_order(inventory, order)
    if total is None:
        print("order could not be filled")
    else:
        print(f"order total: {total:.2f}")
    for book in inventory.find("the"):
        print(book.label(), inventory.stock[book.isbn])
    print("low stock:", [b.title for b in inventory.low_stock()])
    print("value of stock:", inventory.value())
    print("tags:", count_tags(inventory.books.values()))
    print("sales:", monthly_sales(inventory.history))


if __name__ == "__main__":
    main()
