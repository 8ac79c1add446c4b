"""Infrastructure under everything: stage folders and atomic writes, ranks, tracking, progress, reports,
test-only fault injection. Imports nothing from core/, stages/ or cli/."""
