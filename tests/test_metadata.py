from __future__ import annotations

from atlas_shards.metadata import hemisphere_from_row, join_metadata, normalise_id


def test_normalise_id():
    assert normalise_id(" 31768 ") == normalise_id("031768") == "31768"
    assert normalise_id("sub-r001s001") == normalise_id("r001s001 ") == "r001s001"
    assert normalise_id("31768.0") == "31768"


def test_join_r11_table_with_stray_spaces(tmp_path):
    (tmp_path / "ATLAS_R1.1").mkdir()
    (tmp_path / "ATLAS_R1.1" / "ATLAS_Meta-Data_Release_1.1_standard_mni.csv").write_text(
        "INDI Site ID,INDI Subject ID,Session, Hemisphere \n"
        " Site1, 31768 ,t01, Left \n"
        "Site1,31768,t02,Left\n"
        "Site4 ,31859, t01,Right \n"
    )
    rows, notes = join_metadata(tmp_path, ["031768", "031859", "099999"])
    assert set(rows) == {"031768", "031859"}
    assert rows["031768"]["Session"] == "t01"  # first row of the subject
    assert hemisphere_from_row(rows["031768"]) == "left" and hemisphere_from_row(rows["031859"]) == "right"
    assert "INDI Subject ID" in notes[-1] and "2 of 3" in notes[-1]


def test_join_v20_ids_without_prefix_and_unreadable_table(tmp_path):
    (tmp_path / "meta.csv").write_text("Subject ID,Site\nr001s001,R001\nr002s003,R002\n")
    (tmp_path / "broken.xlsx").write_bytes(b"not a spreadsheet")
    rows, notes = join_metadata(tmp_path, ["sub-r001s001", "sub-r002s003"])
    assert rows["sub-r002s003"]["Site"] == "R002"
    assert any("broken.xlsx unreadable" in n for n in notes)
    assert hemisphere_from_row(rows["sub-r001s001"]) is None
