"""The metrics table's summary in words: the command line's lines and the overview's footer."""

import math

from SACBRegistrationLib.pipeline.metrics_table import MetricsTable


def test_summary_lines_say_the_figures_and_mark_missing_ones():
    table = MetricsTable(summary={"dice_before": 0.5, "dice_after": 0.8125, "hd95_before_mm": 5.0,
                                  "hd95_after_mm": math.nan, "assd_before_mm": 2.0, "assd_after_mm": 1.25},
                         regularity={"negative_jacobian_percent": 0.0123, "sdlogj": 0.3})
    assert table.summary_lines() == ["mean Dice 0.500 -> 0.812, HD95 N/A, ASSD 2.00 -> 1.25 mm",
                                     "folding |J|<0: 0.012% of voxels, SDlogJ 0.300"]
    assert table.summary_lines(surface_distance=False)[0] == "mean Dice 0.500 -> 0.812, HD95 N/A"
    # without segmentations: the field's line alone
    assert MetricsTable(regularity={"negative_jacobian_percent": 0.0, "sdlogj": 0.25}).summary_lines() == [
        "folding |J|<0: 0.000% of voxels, SDlogJ 0.250"]
