// `fastify-consul-native dev-agent`: argument parsing and the run loop in-process, plus one real
// process started from the TypeScript source (with this test's own loader) and stopped by SIGTERM.
import t from 'tap'
import { spawn } from 'node:child_process'
import { EventEmitter } from 'node:events'
import { join } from 'node:path'
import { request } from 'undici'
import { USAGE, main, parseArgs, run } from '../lib/dev-agent/cli'

function io (): { out: string[], err: string[], signals: EventEmitter, io: Parameters<typeof main>[1] } {
  const out: string[] = []
  const err: string[] = []
  const signals = new EventEmitter()
  return { out, err, signals, io: { stdout: { write: (s) => out.push(s) }, stderr: { write: (s) => err.push(s) }, signals } }
}

t.test('parseArgs', async (t) => {
  t.same(parseArgs(['dev-agent']), { help: false, options: { port: 8500 } })
  t.same(parseArgs(['dev-agent', '--port', '0', '--host=0.0.0.0', '--datacenter', 'east', '--node-name', 'n1', '--default-policy=deny', '--leaf-ttl', '2h']), {
    help: false,
    options: { port: 0, host: '0.0.0.0', datacenter: 'east', nodeName: 'n1', defaultPolicy: 'deny', leafTTL: '2h' }
  })
  t.same(parseArgs(['--help']), { help: true })
  t.same(parseArgs(['dev-agent', '-h']), { help: true })
  const usage: Array<[string[], string]> = [
    [[], 'missing command'],
    [['agent'], 'unknown command "agent"'],
    [['dev-agent', '--verbose'], 'unknown option "--verbose"'],
    [['dev-agent', '--port'], '--port needs a value'],
    [['dev-agent', '--port', 'x'], '--port must be a number, got "x"'],
    [['dev-agent', '--default-policy', 'maybe'], '--default-policy must be allow or deny, got "maybe"']
  ]
  for (const [argv, message] of usage) t.throws(() => parseArgs(argv), { message }, argv.join(' '))
})

t.test('main: help, usage errors, start failures', async (t) => {
  const help = io()
  t.equal(await main(['--help'], help.io), 0)
  t.same(help.out, [USAGE])
  const bad = io()
  t.equal(await main(['dev-agent', '--nope'], bad.io), 2)
  t.match(bad.err.join(''), /^fastify-consul-native: unknown option "--nope"\n\nUsage: /)
  const invalid = io()
  t.equal(await main(['dev-agent', '--port', '0', '--leaf-ttl', 'soon'], invalid.io), 1)
  t.match(invalid.err.join(''), /^fastify-consul-native: cannot start the dev agent: Invalid dev agent option leafTTL/)
})

t.test('main: prints the address, serves until a signal, then closes', async (t) => {
  for (const signal of ['SIGINT', 'SIGTERM']) {
    const cli = io()
    const done = main(['dev-agent', '--port', '0', '--default-policy', 'allow'], cli.io)
    while (cli.out.length === 0) await new Promise((resolve) => setTimeout(resolve, 5))
    const address = (cli.out[0] as string).trim()
    t.match(address, /^http:\/\/127\.0\.0\.1:\d+$/)
    const self = await request(`${address}/v1/agent/self`)
    t.equal((await self.body.json() as { DebugConfig: { DefaultIntentionPolicy: string } }).DebugConfig.DefaultIntentionPolicy, 'allow')
    cli.signals.emit(signal)
    t.equal(await done, 0, `${signal} stops it`)
    t.equal(cli.signals.listenerCount('SIGINT') + cli.signals.listenerCount('SIGTERM'), 0, 'no listener left')
    await t.rejects(request(`${address}/v1/agent/self`), 'closed')
  }
})

t.test('run sets the exit code', async (t) => {
  const previous = process.exitCode
  const write = process.stderr.write
  process.stderr.write = (() => true) as typeof process.stderr.write
  try {
    await run(['dev-agent', '--nope'])
    t.equal(process.exitCode, 2)
  } finally {
    process.stderr.write = write
    process.exitCode = previous
  }
})

t.test('a real process from the TypeScript source', async (t) => {
  const root = join(__dirname, '..')
  // Tap's TypeScript loader, without its process tracking and coverage: the in-process tests
  // above cover the code; this one checks the process plumbing.
  const execArgv = process.execArgv.filter((arg) => !arg.includes('processinfo'))
  const env = { ...process.env }
  delete env.NODE_V8_COVERAGE
  const child = spawn(process.execPath, [...execArgv, '-e', 'require("./lib/dev-agent/cli.ts").run(process.argv.slice(1))', 'dev-agent', '--port', '0'], {
    cwd: root,
    env,
    stdio: ['ignore', 'pipe', 'pipe']
  })
  let stdout = ''
  child.stdout.setEncoding('utf8')
  const address = await new Promise<string>((resolve, reject) => {
    child.stdout.on('data', (chunk: string) => {
      stdout += chunk
      if (stdout.includes('\n')) resolve(stdout.trim())
    })
    child.once('exit', (code) => reject(new Error(`exited early with ${String(code)}`)))
  })
  t.match(address, /^http:\/\/127\.0\.0\.1:\d+$/, 'prints only its address')
  const roots = await request(`${address}/v1/agent/connect/ca/roots`)
  t.equal(roots.statusCode, 200)
  await roots.body.dump()
  const exited = new Promise<number | null>((resolve) => child.once('exit', resolve))
  child.kill('SIGTERM')
  t.equal(await exited, 0, 'SIGTERM closes it cleanly')
})

t.test('--grpc-port: the gRPC CA service too, its address printed as CONSUL_GRPC_ADDR', async (t) => {
  t.same(parseArgs(['dev-agent', '--grpc-port', '0']), { help: false, options: { port: 8500, grpcPort: 0 } })
  t.throws(() => parseArgs(['dev-agent', '--grpc-port=x']), { message: '--grpc-port must be a number, got "x"' })
  const cli = io()
  const done = main(['dev-agent', '--port', '0', '--grpc-port', '0'], cli.io)
  while (cli.out.length < 2) await new Promise((resolve) => setTimeout(resolve, 5))
  t.match(cli.out[0], /^http:\/\/127\.0\.0\.1:\d+\n$/, 'the HTTP address first, as before')
  t.match(cli.out[1], /^CONSUL_GRPC_ADDR=127\.0\.0\.1:\d+\n$/)
  cli.signals.emit('SIGTERM')
  t.equal(await done, 0)
})
