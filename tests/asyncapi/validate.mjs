// Parse an AsyncAPI document with the official parser and print its diagnostics as JSON.
// Usage: node validate.mjs <document.json|yaml>  (prints [{code, severity, message, path}])
import { readFileSync } from "node:fs";
import { Parser } from "@asyncapi/parser";

const SEVERITIES = ["error", "warning", "information", "hint"];
const source = readFileSync(process.argv[2], "utf8");
const { document, diagnostics } = await new Parser().parse(source);
console.log(
  JSON.stringify({
    parsed: document !== undefined,
    diagnostics: diagnostics.map((d) => ({
      code: String(d.code),
      severity: SEVERITIES[d.severity],
      message: d.message,
      path: d.path.join("/"),
    })),
  }),
);
