# Escape input as the body of a JSON string (no surrounding quotes); lines are joined with \n.
BEGIN {
  for (i = 1; i < 32; i++) ctl[sprintf("%c", i)] = sprintf("\\u%04x", i)
  ctl["\t"] = "\\t"; ctl["\r"] = "\\r"; ctl["\b"] = "\\b"; ctl["\f"] = "\\f"
  re = "[" sprintf("%c", 1) "-" sprintf("%c", 31) "]"
}
{
  gsub(/\\/, "\\\\")
  gsub(/"/, "\\\"")
  out = ""
  while (match($0, re)) {
    out = out substr($0, 1, RSTART - 1) ctl[substr($0, RSTART, 1)]
    $0 = substr($0, RSTART + 1)
  }
  printf "%s%s%s", (NR > 1 ? "\\n" : ""), out, $0
}
