// The README's reference tables match the code: the log events (docs/semantics.md#log-shape) and
// the options.
import t from 'tap'
import { readdirSync, readFileSync, statSync } from 'node:fs'
import { join } from 'node:path'
import { LOG_EVENTS } from '../lib/log'
import { OPTION_NAMES } from '../lib/options'

const readme = readFileSync('README.md', 'utf8')

/** The rows of the Markdown table whose header line is `header`, as arrays of cells. */
function tableAfter (header: string): string[][] {
  const lines = readme.split('\n')
  const start = lines.indexOf(header)
  if (start === -1) throw new Error(`no table headed ${header}`)
  const rows: string[][] = []
  for (let i = start + 2; i < lines.length && lines[i].startsWith('|'); i++) {
    rows.push(lines[i].split(/(?<!\\)\|/).slice(1, -1).map((cell) => cell.trim()))
  }
  return rows
}

const codeNames = (cell: string): string[] => [...cell.matchAll(/`([^`]+)`/g)].map((m) => m[1] as string)

function libFiles (dir = 'lib'): string[] {
  return readdirSync(dir).flatMap((name) => {
    const path = join(dir, name)
    if (statSync(path).isDirectory()) return name === 'dev-agent' ? [] : libFiles(path)
    return path.endsWith('.ts') ? [path] : []
  })
}

t.test('the README lists every log event with its fields and levels, and nothing else', async (t) => {
  const rows = tableAfter('| event | level | fields | when |')
  const documented = new Map(rows.map(([event, level, fields]) => [codeNames(event as string)[0], { levels: (level as string).split(/,\s*/), fields: codeNames(fields as string) }]))
  t.same([...documented.keys()].sort(), Object.keys(LOG_EVENTS).sort(), 'the same events')
  for (const [event, fields] of Object.entries(LOG_EVENTS)) {
    t.same(documented.get(event)?.fields, [...fields], `${event}: the same fields, in order`)
  }

  // Every line the code writes: logEvent(sink, 'level', 'event', ...) or a literal level variable.
  const written = new Map<string, Set<string>>()
  for (const file of libFiles()) {
    const source = readFileSync(file, 'utf8')
    t.notMatch(source, /consulNative: \{ event:/, `${file}: lines go through logEvent()`)
    for (const m of source.matchAll(/logEvent\([^,]+, '(debug|info|warn|error)', '([a-z-]+)'/g)) {
      const levels = written.get(m[2] as string) ?? new Set()
      levels.add(m[1] as string)
      written.set(m[2] as string, levels)
    }
  }
  t.ok(written.size > 20, 'the scan finds the log calls')
  for (const [event, levels] of written) {
    const row = documented.get(event)
    t.ok(row, `${event} is documented`)
    for (const level of levels) t.ok(row?.levels.includes(level), `${event} at ${level} is documented`)
  }
})

t.test('the README\'s options table lists every option', async (t) => {
  const rows = tableAfter('| option | type | default | meaning |')
  const top = new Set(rows.flatMap(([name]) => codeNames(name as string).map((n) => n.split('.')[0])))
  t.same([...top].sort(), [...OPTION_NAMES].sort())
})
