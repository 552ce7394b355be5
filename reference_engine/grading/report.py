"""The grader's report as a table for people, or JSON for programs."""

from __future__ import annotations

import textwrap


def format_report(report) -> str:
    lines = [f"Grading {report.path}", ""]
    lines.append(f"  {'task':<5} {'check':<20} {'points':>7}  result")
    previous = None
    for r in report.results:
        lines.append(f"  {r.task:<5} {r.name:<20} {f'{r.points}/{r.max_points}':>7}  {r.status}")
        repeated = (r.task, r.message) == previous  # a task-wide problem is said once
        previous = (r.task, r.message)
        if r.message and not repeated and (r.status != "pass" or r.name == "speed"):
            for part in textwrap.wrap(r.message, 92):
                lines.append(f"  {'':<5} {'':<20} {'':>7}    {part}")
    for note in report.notes:
        lines.append(f"  note: {note}")
    lines += ["", f"  score {report.score}/{report.max_score}" + ("  (all checks pass)" if report.all_passed else "")]
    return "\n".join(lines)
