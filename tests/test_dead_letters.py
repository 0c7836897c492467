"""The dead-letter queue as its own door: any stage writes to it, a later success closes rows in
any partition, items that left the stage's input are superseded, history is never deleted."""

from __future__ import annotations

from resources import dead_letters
from resources.dead_letters import DeadLetter, write_dead_letters
from resources.warehouse import fetch_all


def rows(warehouse, stage: str) -> dict[tuple[str, str], dict]:
    with warehouse.connect(read_only=True) as con:
        found = fetch_all(con, """SELECT partition_key, item_key, reason_class, error_message, attempts, resolved_at,
                                         resolution FROM ops.dead_letter WHERE stage = ? ORDER BY ALL""", [stage])
    names = ("reason_class", "error_message", "attempts", "resolved_at", "resolution")
    return {(row[0], row[1]): dict(zip(names, row[2:])) for row in found}


def test_any_stage_can_dead_letter_into_a_fresh_warehouse_and_attempts_add_up(warehouse):
    letters = [DeadLetter("c1", "invalid_output", "first", 1, ""), DeadLetter("c1", "invalid_output", "again", 1, "")]
    write_dead_letters(warehouse, "recommendations", None, "ease", letters)
    write_dead_letters(warehouse, "recommendations", None, "ease", letters[:1])
    row = rows(warehouse, "recommendations")[("", "c1")]
    assert row["attempts"] == 2 and row["error_message"] == "first" and row["resolved_at"] is None


def test_a_success_closes_the_items_rows_in_every_partition_and_a_new_failure_reopens(warehouse):
    for day in ("2011-09-01", "2011-09-02", "2011-09-03"):
        write_dead_letters(warehouse, "s", day, "m", [DeadLetter("a", "server_error", "503", 3, ""),
                                                      DeadLetter(f"only-{day}", "timeout", "slow", 5, "")])
    with warehouse.transaction() as con:
        assert dead_letters.count_open(con, "s") == 6
        assert dead_letters.resolve_keys(con, "s", ["a", "only-2011-09-01"]) == 4
        assert dead_letters.count_open(con, "s") == 2
    found = rows(warehouse, "s")
    assert all(found[(day, "a")]["resolution"] == "succeeded" for day in ("2011-09-01", "2011-09-02", "2011-09-03"))
    write_dead_letters(warehouse, "s", "2011-09-02", "m", [DeadLetter("a", "timeout", "slow again", 1, "")])
    reopened = rows(warehouse, "s")[("2011-09-02", "a")]
    assert reopened["resolved_at"] is None and reopened["resolution"] is None and reopened["attempts"] == 4


def test_items_no_longer_asked_for_are_superseded_and_kept(warehouse):
    write_dead_letters(warehouse, "s", "d", "m", [DeadLetter(k, "server_error", "503", 1, "") for k in ("a", "b")])
    with warehouse.transaction() as con:
        con.execute("CREATE TABLE current_items AS SELECT 'a' AS item_key")
        assert dead_letters.supersede(con, "s", "SELECT item_key FROM current_items") == 1
        assert dead_letters.open_by_reason(con, "s") == {"server_error": 1}
    found = rows(warehouse, "s")
    assert found[("d", "b")]["resolution"] == "superseded" and found[("d", "a")]["resolved_at"] is None


def test_an_item_that_failed_in_two_partitions_is_one_open_item(warehouse):
    """The dead-letter share counts items: the same product dead-lettered on two days has two rows
    (one a partition) and is one item of the catalog (it read 2 of 199 items, over the 1 % bar)."""
    for day in ("2011-09-01", "2011-09-02"):
        write_dead_letters(warehouse, "s", day, "m", [DeadLetter("a", "invalid_output", "NaN", 1, "")])
    write_dead_letters(warehouse, "s", "2011-09-02", "m", [DeadLetter("b", "timeout", "slow", 1, "")])
    with warehouse.connect(read_only=True) as con:
        assert dead_letters.count_open(con, "s") == 3
        assert dead_letters.count_open_items(con, "s") == 2
