// Render a report.html offline in headless Chromium (@sparticuz/chromium + puppeteer-core) and print what the
// page shows as JSON: tables, images and whether each loaded, network requests that left the file, a screenshot.
// Usage: node render.mjs REPORT.html SCREENSHOT.png
import chromium from "@sparticuz/chromium";
import puppeteer from "puppeteer-core";
import { pathToFileURL } from "node:url";

const [report, shot] = process.argv.slice(2);
const browser = await puppeteer.launch({
  args: [...chromium.args, "--disable-background-networking", "--no-first-run"],
  executablePath: await chromium.executablePath(),
  headless: true,
  defaultViewport: { width: 1200, height: 1600 },
});
try {
  const page = await browser.newPage();
  const external = [];
  page.on("request", (req) => { if (!req.url().startsWith("file:") && !req.url().startsWith("data:")) external.push(req.url()); });
  const errors = [];
  page.on("pageerror", (err) => errors.push(String(err)));
  await page.goto(pathToFileURL(report).href, { waitUntil: "load" });
  const seen = await page.evaluate(() => ({
    tables: document.querySelectorAll("table").length,
    rows: document.querySelectorAll("tr").length,
    images: [...document.images].map((img) => ({ alt: img.alt, complete: img.complete, width: img.naturalWidth })),
    text: document.body.innerText.length,
  }));
  await page.screenshot({ path: shot, fullPage: false });
  console.log(JSON.stringify({ ...seen, external, errors }));
} finally {
  await browser.close();
}
