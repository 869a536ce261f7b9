// Keeps docs/semantics.md the place every rule reference resolves to, and the repository free of
// references to anything outside it: a cited anchor that is renamed or removed fails here.
import t from 'tap'
import { readdirSync, readFileSync, statSync } from 'node:fs'
import { join } from 'node:path'

const ROOT = join(__dirname, '..')
const SEMANTICS = readFileSync(join(ROOT, 'docs', 'semantics.md'), 'utf8')
const REFERENCE = /docs\/semantics\.md#([A-Za-z0-9_-]*)/g

/** Files under `dir` (relative to the repository) whose name ends with one of `extensions`. */
function filesUnder (dir: string, extensions: readonly string[]): string[] {
  const out: string[] = []
  for (const entry of readdirSync(join(ROOT, dir))) {
    const path = join(dir, entry)
    if (statSync(join(ROOT, path)).isDirectory()) out.push(...filesUnder(path, extensions))
    else if (extensions.some((ext) => entry.endsWith(ext))) out.push(path)
  }
  return out
}

/** The anchors of a Markdown text: an `<a id="..."></a>` line of its own (examples in prose do not count). */
function anchorsOf (markdown: string): string[] {
  return [...markdown.matchAll(/^<a id="([^"]+)"><\/a>$/gm)].map((m) => m[1] as string)
}

/** Every citation of an anchor of docs/semantics.md in `files`, with where it occurs. */
function referencesIn (files: readonly string[]): Array<{ anchor: string, where: string }> {
  const refs: Array<{ anchor: string, where: string }> = []
  for (const file of files) {
    readFileSync(join(ROOT, file), 'utf8').split('\n').forEach((line, i) => {
      for (const m of line.matchAll(REFERENCE)) refs.push({ anchor: m[1] as string, where: `${file}:${i + 1}` })
    })
  }
  return refs
}

const ANCHORS = anchorsOf(SEMANTICS)
const SOURCES = filesUnder('lib', ['.ts'])

t.test('docs/semantics.md gives every rule a distinct, short, lower-case anchor', async (t) => {
  t.ok(ANCHORS.length >= 40, `${ANCHORS.length} anchors`)
  t.same(ANCHORS.filter((a, i) => ANCHORS.indexOf(a) !== i), [], 'no anchor twice')
  t.same(ANCHORS.filter((a) => !/^[a-z0-9]+(?:-[a-z0-9]+)*$/.test(a)), [], 'lower-case words joined by "-"')
  for (const anchor of ['precedence', 'first-match', 'identity', 'trust-domain', 'default-policy', 'path-normalization',
    'headers', 're2', 'status-codes', 'not-supported', 'blocking-queries']) {
    t.ok(ANCHORS.includes(anchor), `#${anchor} exists`)
  }
})

t.test('every link inside docs/semantics.md points to one of its anchors', async (t) => {
  const links = [...SEMANTICS.matchAll(/\]\(#([^)]+)\)/g)].map((m) => m[1] as string)
  t.ok(links.length > 0)
  t.same(links.filter((link) => !ANCHORS.includes(link)), [])
})

t.test('every anchor of docs/semantics.md cited in lib/ exists', async (t) => {
  const refs = referencesIn(SOURCES)
  t.ok(refs.length >= 40, `${refs.length} citations in ${SOURCES.length} files`)
  t.same(refs.filter((r) => !ANCHORS.includes(r.anchor)), [], 'unresolved citations')
})

t.test('every anchor of docs/semantics.md cited in tests, benchmarks, examples and the README exists', async (t) => {
  const files = [...filesUnder('test', ['.ts']), ...filesUnder('bench', ['.js', '.ts']), ...filesUnder('examples', ['.js', '.ts']), 'README.md']
  t.same(referencesIn(files).filter((r) => !ANCHORS.includes(r.anchor)), [], 'unresolved citations')
})

t.test('lib/ cites rules by anchor, not by the numbering of a document outside the repository', async (t) => {
  const stale = /SEMANTICS|Part [AB]\b|\(A\d+\b|\(T\d+\)|captured\/|§\d+\.\d+(?!\.)/
  const found: string[] = []
  for (const file of SOURCES) {
    readFileSync(join(ROOT, file), 'utf8').split('\n').forEach((line, i) => {
      // RFC sections (`RFC 5280 §4.2.1.6`) are references to public standards, not to that document.
      if (stale.test(line) && !/RFC \d+ §/.test(line)) found.push(`${file}:${i + 1}: ${line.trim()}`)
    })
  }
  t.same(found, [])
})

t.test('no file of the repository reads or links to a path beside it', async (t) => {
  // A relative path to the reference folder beside the repository, as text or as join() arguments,
  // and absolute paths of the machine the project was built on.
  const beside = new RegExp([String.raw`\.\./shared`, String.raw`['"]\.\.['"]\s*,\s*['"]shared['"]`, String.raw`\/work\/`].join('|'))
  const files = [
    ...['lib', 'test', 'bench', 'examples', 'scripts', 'bin', 'docs'].flatMap((dir) => filesUnder(dir, ['.ts', '.js', '.md', '.json', '.txt'])),
    'README.md', 'package.json', '.ci/run', '.taprc', 'eslint.config.js', 'tsconfig.json', 'tsconfig.test.json'
  ]
  t.ok(files.length > 50, `${files.length} files`)
  const found: string[] = []
  for (const file of files) {
    readFileSync(join(ROOT, file), 'utf8').split('\n').forEach((line, i) => {
      if (beside.test(line)) found.push(`${file}:${i + 1}`)
    })
  }
  t.same(found, [])
})
