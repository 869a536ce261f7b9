// `fastify-consul-native explain` and `verify` against the dev agent (docs/semantics.md#rollout-cli):
// human and JSON output, a candidate side by side, exit statuses 0/1/2, one line per error.
import t from 'tap'
import type { Test } from 'tap'
import { spawn } from 'node:child_process'
import { EventEmitter } from 'node:events'
import { mkdtemp, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { main } from '../lib/dev-agent/cli'
import { ROLLOUT_USAGE, parseRolloutArgs, rolloutMain, stepLine } from '../lib/rollout-cli'
import type { DevAgent } from '../lib/dev-agent/index'
import { agentCall, setIntentions, setProtocol, startAgent } from './helpers/mesh'

interface Run { code: number, out: string, err: string }

async function run (agent: DevAgent | string, ...argv: string[]): Promise<Run> {
  const out: string[] = []
  const err: string[] = []
  const env = { CONSUL_HTTP_ADDR: typeof agent === 'string' ? agent : agent.address }
  const code = await rolloutMain(argv, { stdout: { write: (s) => out.push(s) }, stderr: { write: (s) => err.push(s) }, env })
  return { code, out: out.join(''), err: err.join('') }
}

const WEB = 'intention default/web => default/api (precedence 9)'

async function setup (t: Test): Promise<{ agent: DevAgent, dir: string }> {
  const agent = await startAgent(t, { defaultPolicy: 'deny' })
  await setProtocol(agent, 'api', 'http')
  await setIntentions(agent, 'api', [
    { Name: 'web', Permissions: [{ Action: 'deny', HTTP: { PathPrefix: '/admin' } }, { Action: 'allow', HTTP: { PathPrefix: '/', Header: [{ Name: 'x-env', Exact: 'prod' }] } }] },
    { Name: '*', Action: 'deny' }
  ])
  const dir = await mkdtemp(join(tmpdir(), 'rollout-cli-'))
  t.teardown(async () => await rm(dir, { recursive: true, force: true }))
  return { agent, dir }
}

const CANDIDATE = {
  Kind: 'service-intentions',
  Name: 'api',
  Sources: [{ Name: 'web', Permissions: [{ Action: 'allow', HTTP: { PathPrefix: '/admin', Methods: ['GET'] } }] }, { Name: '*', Action: 'deny' }]
}

t.test('explain: the decision and its trace, for a person and as JSON, live and candidate', async (t) => {
  const { agent, dir } = await setup(t)
  const human = await run(agent, 'explain', '--service', 'api', '--source', 'web', 'GET', '/admin')
  t.equal(human.code, 0)
  t.equal(human.err, '')
  t.equal(human.out, [
    'api <- web: GET /admin',
    `  DENY  ${WEB}, permission 1 (deny)`,
    '    path /admin',
    `    ${WEB}: source matches`,
    '      permission 1 (deny) on /admin: matches',
    ''
  ].join('\n'))
  const header = await run(agent, 'explain', '--service=api', '--source', 'web', '-H', 'x-env: dev', 'GET', '/items')
  t.match(header.out, 'permission 2 (allow) on /items: header x-env does not match')
  t.match(header.out, 'no permission matched, default policy (deny)\n')
  const ok = await run(agent, 'explain', '--service', 'api', '--source', 'web', '--header', 'x-env: prod', 'GET', '/items')
  t.match(ok.out, `  ALLOW  ${WEB}, permission 2 (allow)`)
  t.match((await run(agent, 'explain', '--service', 'api', '--source', 'web', 'GET', '/a%00')).out, 'REJECT (400)')
  t.match((await run(agent, 'explain', '--service', 'api', '--source', 'web', 'POST', '/admin')).out, 'permission 1 (deny) on /admin: matches')

  const id = `spiffe://${agent.trustDomain}/ns/default/dc/dc1/svc/web`
  const json = await run(agent, 'explain', '--service', 'api', '--source', id, 'GET', '/admin', '--json')
  const parsed = JSON.parse(json.out)
  t.same(parsed.request, { source: id, method: 'GET', path: '/admin', headers: {} })
  t.match(parsed.live, { allow: false, outcome: 'deny', decidedBy: { intention: WEB, permission: 1, defaultPolicy: false } })
  t.same({ allow: parsed.allow, reason: parsed.reason, outcome: parsed.outcome, decidedBy: parsed.decidedBy, trace: parsed.trace },
    { allow: parsed.live.allow, reason: parsed.live.reason, outcome: parsed.live.outcome, decidedBy: parsed.live.decidedBy, trace: parsed.live.trace },
    'the live explanation is at the top too, as explain() returns it')
  t.notOk('candidate' in parsed)
  // Another trust domain: no request could carry that identity verified.
  const foreign = JSON.parse((await run(agent, 'explain', '--service', 'api', '--source', 'spiffe://x.consul/ns/default/dc/dc1/svc/web', 'GET', '/admin', '--json')).out)
  t.match(foreign, { allow: false, outcome: 'unauthenticated', decidedBy: null })

  const file = join(dir, 'candidate.json')
  await writeFile(file, JSON.stringify(CANDIDATE))
  const side = await run(agent, 'explain', '--service', 'api', '--source', 'web', '--candidate', file, 'GET', '/admin')
  t.match(side.out, `  live:      DENY  ${WEB}, permission 1 (deny)`)
  t.match(side.out, `  candidate: ALLOW  ${WEB}, permission 1 (allow)`)
  t.match(side.out, '  the candidate changes this verdict\n')
  t.match((await run(agent, 'explain', '--service', 'api', '--source', 'db', '--candidate', file, 'GET', '/')).out, '  same verdict\n')
  const sideJson = JSON.parse((await run(agent, 'explain', '--service', 'api', '--source', 'web', '--candidate', file, '--json', 'GET', '/admin')).out)
  t.equal(sideJson.candidate.allow, true)
  t.equal(sideJson.live.allow, false)

  // The mesh normalization applies, as in the plugin.
  await agentCall(agent, 'PUT', '/v1/config', { Kind: 'mesh', HTTP: { Incoming: { RequestNormalization: { PathWithEscapedSlashesAction: 'REJECT_REQUEST' } } } })
  t.match((await run(agent, 'explain', '--service', 'api', '--source', 'web', 'GET', '/a%2Fb')).out, 'REJECT (400)')
  // The default policy can be forced, as the plugin's option does.
  t.match((await run(agent, 'explain', '--service', 'api', '--source', 'web', '--default-policy', 'allow', 'GET', '/x')).out, 'default policy (allow)')
})

t.test('verify: 0 when every case agrees, 1 with each disagreement and its trace', async (t) => {
  const { agent, dir } = await setup(t)
  const cases = join(dir, 'cases.json')
  await writeFile(cases, JSON.stringify([
    { source: 'web', method: 'GET', path: '/items', headers: { 'x-env': 'prod' }, expect: 'allow' },
    { source: 'web', method: 'GET', path: '/admin', expect: 'deny' },
    { source: 'billing', method: 'GET', path: '/', expect: 'deny' }
  ]))
  const pass = await run(agent, 'verify', '--service', 'api', cases)
  t.equal(pass.code, 0)
  t.equal(pass.out, '3 case(s) against the live intentions of api: all agree\n')

  const wrong = join(dir, 'wrong.json')
  await writeFile(wrong, JSON.stringify([
    { source: 'web', method: 'GET', path: '/admin', expect: 'allow' },
    { source: 'web', method: 'GET', path: '/items', headers: { 'x-env': 'prod' }, expect: 'allow' }
  ]))
  const allowed = join(dir, 'allowed.json')
  await writeFile(allowed, JSON.stringify([{ source: 'web', method: 'GET', path: '/items', headers: { 'x-env': 'prod' }, expect: 'deny' }]))
  t.match((await run(agent, 'verify', '--service', 'api', allowed)).out, 'case 1: web GET /items expected deny, got allow\n')
  const fail = await run(agent, 'verify', '--service', 'api', wrong)
  t.equal(fail.code, 1)
  t.equal(fail.out, [
    'case 1: web GET /admin expected allow, got deny',
    `  DENY  ${WEB}, permission 1 (deny)`,
    '    path /admin',
    `    ${WEB}: source matches`,
    '      permission 1 (deny) on /admin: matches',
    '2 case(s) against the live intentions of api: 1 disagree',
    ''
  ].join('\n'))
  const failJson = JSON.parse((await run(agent, 'verify', '--service', 'api', '--json', wrong)).out)
  t.match(failJson, { service: 'api', against: 'live intentions', cases: 2, disagreements: [{ case: 1, expect: 'allow', got: { allow: false, decidedBy: { permission: 1 } } }] })

  // With a candidate, the cases are checked against it.
  const file = join(dir, 'candidate.json')
  await writeFile(file, JSON.stringify(CANDIDATE))
  const candidate = await run(agent, 'verify', '--service', 'api', '--candidate', file, wrong)
  t.equal(candidate.code, 1, 'the candidate allows /admin but no longer /items')
  t.match(candidate.out, 'case 2: web GET /items expected allow, got deny')
  t.match(candidate.out, `against the candidate ${file} of api: 1 disagree`)
})

t.test('errors: one line and exit status 2', async (t) => {
  const { agent, dir } = await setup(t)
  const notJson = join(dir, 'bad.json')
  await writeFile(notJson, '{ nope')
  const cases = join(dir, 'cases.json')
  await writeFile(cases, '[]')
  const write = async (name: string, value: unknown): Promise<string> => {
    const path = join(dir, name)
    await writeFile(path, JSON.stringify(value))
    return path
  }
  const rows: Array<[string[], RegExp]> = [
    [['verify', '--service', 'api', notJson], /^fastify-consul-native verify: case file .*bad.json is not JSON: /],
    [['verify', '--service', 'api', join(dir, 'missing.json')], /^fastify-consul-native verify: cannot read case file .*missing.json: ENOENT/],
    [['verify', '--service', 'api', await write('object.json', {})], /must hold a JSON array/],
    [['verify', '--service', 'api', await write('c1.json', ['x'])], /case 1 must be an object/],
    [['verify', '--service', 'api', await write('c2.json', [{ source: 'web', method: 'GET', path: '/', expect: 'maybe' }])], /case 1: expect must be "allow" or "deny"/],
    [['verify', '--service', 'api', await write('c3.json', [{ source: 'web', method: 'GET', expect: 'deny' }])], /case 1: path must be a non-empty string/],
    [['verify', '--service', 'api', await write('c4.json', [{ source: 'web', method: 'GET', path: '/', expect: 'deny', colour: 1 }])], /unknown key "colour"/],
    [['verify', '--service', 'api', await write('c5.json', [{ source: 'a/b/c/d', method: 'GET', path: '/', expect: 'deny' }])], /explain.source/],
    [['verify', '--service', 'nope', cases], /^fastify-consul-native verify: unknown service "nope": no instance is registered/],
    [['verify', '--service', 'api', '--candidate', notJson, cases], /candidate .*bad.json is not JSON/],
    [['verify', '--service', 'api', '--candidate', await write('cand.json', { Kind: 'service-intentions', Name: 'web', Sources: [] }), cases], /Name must be this service/],
    [['verify', '--service', 'api', '--candidate', await write('cand2.json', { Kind: 'service-intentions', Name: 'api', Sources: [{ Name: 'web', Permissions: [{ Action: 'allow', HTTP: { PathRegex: '(' } }] }] }), cases], /candidate .*cand2\.json: .*PathRegex "\(" is not a valid RE2 regular expression/],
    [['explain', '--service', 'api', 'GET', '/'], /explain needs --source \(see --help\)\n$/],
    [['explain', '--service', 'api', '--source', 'web', 'GET'], /a method and a path/],
    [['explain', '--source', 'web', 'GET', '/'], /--service is required/],
    [['explain', '--service', 'api', '--source', 'web', '-H', 'novalue', 'GET', '/'], /header "novalue" must be "name: value"/],
    [['explain', '--service', 'api', '--source', 'web', '--verbose', 'GET', '/'], /unknown option "--verbose"/],
    [['explain', '--service', 'api', '--source'], /--source needs a value/],
    [['explain', '--service', 'api', '--source', 'web', '--default-policy', 'maybe', 'GET', '/'], /--default-policy must be allow, deny or agent/],
    [['verify', '--service', 'api'], /verify needs one case file/],
    [['verify', '--service', 'api', '--source', 'web', cases], /verify takes sources and headers from the case file/]
  ]
  for (const [argv, message] of rows) {
    const res = await run(agent, ...argv)
    t.equal(res.code, 2, argv.join(' '))
    t.match(res.err, message, argv.join(' '))
    t.equal(res.err.split('\n').length, 2, 'one line')
    t.equal(res.out, '')
  }
  const unreachable = await run('127.0.0.1:1', 'verify', '--service', 'api', cases)
  t.equal(unreachable.code, 2)
  t.match(unreachable.err, /^fastify-consul-native verify: Consul agent unreachable at /)
  const badAddress = await run('ftp://x', 'explain', '--service', 'api', '--source', 'web', 'GET', '/')
  t.match(badAddress, { code: 2, err: /CONSUL_HTTP_ADDR/ })

  // A service known only by its registration or service-defaults is known.
  await agentCall(agent, 'PUT', '/v1/config', { Kind: 'service-defaults', Name: 'billing', Protocol: 'http' })
  t.equal((await run(agent, 'verify', '--service', 'billing', cases)).code, 0)
  await agentCall(agent, 'PUT', '/v1/agent/service/register', { Name: 'cron', Port: 1, Connect: { Native: true } })
  t.equal((await run(agent, 'verify', '--service', 'cron', cases)).code, 0)
})

t.test('help, parsing, and dispatch from the package command', async (t) => {
  const help = await run('127.0.0.1:1', 'explain', '--help')
  t.same(help, { code: 0, out: ROLLOUT_USAGE, err: '' })
  t.match(parseRolloutArgs('explain', ['--service', 'api', '--source', 'web', '--http-addr', 'h:1', '--token', 'tok', '--datacenter', 'dc2', '--namespace', 'n', '--partition', 'p', 'GET', '/']), {
    agent: { address: 'h:1', token: 'tok' }, datacenter: 'dc2', namespace: 'n', partition: 'p', positional: ['GET', '/']
  })
  t.match(parseRolloutArgs('verify', ['--service', 'api', '-', '--default-policy=deny']), { positional: ['-'], defaultPolicy: 'deny' })
  t.equal(stepLine({ step: 'route', route: 'GET /a', exempt: true, overrides: 0 }), 'route GET /a (exempt), 0 override source(s)')
  t.equal(stepLine({ step: 'route', route: 'GET /a', exempt: false, overrides: 2 }), 'route GET /a, 2 override source(s)')
  t.equal(stepLine({ step: 'permission', intention: 'i', permission: 1, action: 'allow', path: '/', matched: false, failed: 'jwt' }), '  permission 1 (allow) on /: needs a JWT')

  const { agent, dir } = await setup(t)
  const cases = join(dir, 'cases.json')
  await writeFile(cases, JSON.stringify([{ source: 'web', method: 'GET', path: '/admin', expect: 'allow' }]))
  const out: string[] = []
  const code = await main(['verify', '--service', 'api', cases], { stdout: { write: (s) => out.push(s) }, stderr: { write: (s) => out.push(s) }, signals: new EventEmitter(), env: { CONSUL_HTTP_ADDR: agent.address } })
  t.equal(code, 1)
  t.match(out.join(''), '1 disagree')

  // A real process, as CI runs it: the exit status is the contract.
  const execArgv = process.execArgv.filter((arg) => !arg.includes('processinfo'))
  const env: NodeJS.ProcessEnv = { ...process.env, CONSUL_HTTP_ADDR: agent.address }
  delete env.NODE_V8_COVERAGE
  const child = spawn(process.execPath, [...execArgv, '-e', 'require("./lib/dev-agent/cli.ts").run(process.argv.slice(1))', 'verify', '--service', 'api', cases], {
    cwd: join(__dirname, '..'), env, stdio: ['ignore', 'pipe', 'pipe']
  })
  let stdout = ''
  child.stdout.setEncoding('utf8').on('data', (chunk: string) => { stdout += chunk })
  const [status] = await new Promise<[number | null]>((resolve) => child.once('exit', (c) => resolve([c])))
  t.equal(status, 1)
  t.match(stdout, 'case 1: web GET /admin expected allow, got deny')
})
