import t from 'tap'
import { once } from 'node:events'
import { readFileSync } from 'node:fs'
import http from 'node:http'
import https from 'node:https'
import net from 'node:net'
import type { AddressInfo } from 'node:net'
import { resolve } from 'node:path'
import type { TLSSocket } from 'node:tls'
import { DevCatalog, unknownServiceMessage } from '../lib/dev-agent/catalog'
import type { CheckStatus, DevCatalogOptions } from '../lib/dev-agent/catalog'

const CAPTURED = resolve(__dirname, 'fixtures', 'consul', 'health-connect-api.json')

// A throwaway self-signed P-256 certificate for `health.test` and 127.0.0.1, valid until 2126.
const CERT = `-----BEGIN CERTIFICATE-----
MIIBoDCCAUegAwIBAgIUaqFlvipLpObDKOsRfzMEgYyBekIwCgYIKoZIzj0EAwIw
FjEUMBIGA1UEAwwLaGVhbHRoLnRlc3QwIBcNMjYxMTI2MDc0MjQ4WhgPMjEyNjEx
MDIwNzQyNDhaMBYxFDASBgNVBAMMC2hlYWx0aC50ZXN0MFkwEwYHKoZIzj0CAQYI
KoZIzj0DAQcDQgAE0DZH3bwsh5jeYPR4heBqmPz6E+kNVPA3CfQmy7l7GgK+7MOE
iz04zaMqPNh0QwxQEIGtfd5o43yio3uQp9JXDqNxMG8wHQYDVR0OBBYEFFxpoUm1
qAsUHeZ0hYjLoKMMNiowMB8GA1UdIwQYMBaAFFxpoUm1qAsUHeZ0hYjLoKMMNiow
MA8GA1UdEwEB/wQFMAMBAf8wHAYDVR0RBBUwE4ILaGVhbHRoLnRlc3SHBH8AAAEw
CgYIKoZIzj0EAwIDRwAwRAIgTmfkmwTHZdNrikhU+CrOE59NBUWtf7pEwhaI35da
H4ICICTS7mQrAKCVQt5SgSWVTT1N6jvB0uu7I8c0OsTrIxyF
-----END CERTIFICATE-----
`
const KEY = `-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgI3QRIn2ClkGm0m48
Ui2a2X73LJ/sve6TQcPCa3Y5rMuhRANCAATQNkfdvCyHmN5g9HiF4GqY/PoT6Q1U
8DcJ9CbLuXsaAr7sw4SLPTjNoyo82HRDDFAQga193mjjfKKje5Cn0lcO
-----END PRIVATE KEY-----
`

// Tiny intervals so the suite runs in seconds; every wait is on onChange, never on a clock.
const FAST = { minCheckInterval: 20, maxFirstRunDelay: 5, minDeregisterCriticalAfter: 0, reapInterval: 10 }
const WAIT_LIMIT_MS = 8000

type Any = any

interface Harness {
  catalog: DevCatalog
  events: string[]
  index: () => number
  /** Resolves once `done()` holds, re-checking after every onChange. */
  until: (what: string, done: () => boolean) => Promise<void>
  /** The health view of one check of a Connect-native service. */
  check: (service: string, checkId: string) => Any
  status: (service: string, checkId: string) => CheckStatus | undefined
}

function harness (tt: tap.Test, opts: Partial<DevCatalogOptions> = {}): Harness {
  let index = 10
  const events: string[] = []
  const waiters = new Set<() => void>()
  const catalog = new DevCatalog({
    nodeName: 'vm',
    nodeId: 'cba036a6-6b04-fad8-c51b-a6c5fb5ec7bf',
    datacenter: 'dc1',
    nodeAddress: '127.0.0.1',
    nextIndex: () => ++index,
    onChange: (what) => {
      events.push(what)
      for (const waiter of [...waiters]) waiter()
    },
    timing: FAST,
    ...opts
  })
  tt.teardown(() => catalog.close())
  const check = (service: string, checkId: string): Any => {
    for (const entry of catalog.healthConnect(service, false) as Any[]) {
      for (const c of entry.Checks) if (c.CheckID === checkId) return c
    }
    return undefined
  }
  const until = async (what: string, done: () => boolean): Promise<void> => {
    if (done()) return
    await new Promise<void>((resolve, reject) => {
      // A safety net, not a sleep: it only fires when the awaited change never comes.
      const timer = setTimeout(() => {
        waiters.delete(waiter)
        reject(new Error(`timed out waiting for ${what}`))
      }, WAIT_LIMIT_MS)
      const waiter = (): void => {
        if (!done()) return
        waiters.delete(waiter)
        clearTimeout(timer)
        resolve()
      }
      waiters.add(waiter)
    })
  }
  return { catalog, events, index: () => index, until, check, status: (service, id) => check(service, id)?.Status }
}

function native (name: string, id: string, extra: Record<string, unknown> = {}): Record<string, unknown> {
  return { ID: id, Name: name, Address: '127.0.0.1', Port: 8443, Connect: { Native: true }, ...extra }
}

interface Seen { method: string, url: string, headers: http.IncomingHttpHeaders, body: string }

/** An HTTP server with one route per behaviour a check must handle. */
async function httpServer (tt: tap.Test): Promise<{ base: string, seen: Seen[], hits: Map<string, number>, server: http.Server }> {
  const seen: Seen[] = []
  const hits = new Map<string, number>()
  const sequences = new Map<string, number>()
  const server = http.createServer((req, res) => {
    let body = ''
    req.setEncoding('utf8')
    req.on('data', (chunk: string) => { body += chunk })
    req.on('end', () => {
      const url = req.url as string
      seen.push({ method: req.method as string, url, headers: req.headers, body })
      hits.set(url, (hits.get(url) ?? 0) + 1)
      const [, route, arg] = url.split('/')
      const send = (code: number, text: string, headers: Record<string, string> = {}): void => {
        res.writeHead(code, headers)
        res.end(text)
      }
      switch (route) {
        case 'ok': return send(200, 'healthy')
        case 'busy': return send(429, 'slow down')
        case 'fail': return send(500, 'boom')
        case 'echo': return send(200, `${req.method as string} ${body}`)
        case 'big': return send(200, `${'x'.repeat(20_000)}0123456789`)
        case 'redirect': return send(302, '', { Location: '/ok' })
        case 'see-other': return send(303, '', { Location: '/echo' })
        case 'temporary': return send(307, '', { Location: '/echo' })
        case 'no-location': return send(302, 'nowhere')
        case 'bad-location': return send(302, '', { Location: 'http://[::1' })
        case 'loop': return send(302, '', { Location: '/loop' })
        case 'stall':
          res.writeHead(200)
          res.write('partial')
          server.emit('stalled')
          return
        case 'slow':
          server.emit('slow', req)
          return
        case 'sequence': {
          // /sequence/<name>/<first code>/<later code>
          const [, , , first, later] = url.split('/')
          const n = (sequences.get(arg as string) ?? 0) + 1
          sequences.set(arg as string, n)
          return send(Number(n === 1 ? first : later), `run ${n}`)
        }
        case 'toggle': {
          const n = (sequences.get(arg as string) ?? 0) + 1
          sequences.set(arg as string, n)
          return send(n % 2 === 0 ? 500 : 200, 'toggle')
        }
        default: return send(200, 'counted')
      }
    })
  })
  server.listen(0, '127.0.0.1')
  await once(server, 'listening')
  tt.teardown(async () => {
    server.closeAllConnections()
    server.close()
    await once(server, 'close')
  })
  return { base: `http://127.0.0.1:${(server.address() as AddressInfo).port}`, seen, hits, server }
}

async function closedPort (): Promise<number> {
  const server = net.createServer()
  server.listen(0, '127.0.0.1')
  await once(server, 'listening')
  const { port } = server.address() as AddressInfo
  server.close()
  await once(server, 'close')
  return port
}

/** Lets pending I/O callbacks and promise reactions run (a tick, not a sleep). */
async function settle (): Promise<void> {
  for (let i = 0; i < 5; i++) await new Promise((resolve) => setImmediate(resolve))
}

/** Checks that `actual` has exactly the keys of `expected`, in order, with values of the same JSON types. */
function sameShape (tt: tap.Test, actual: Any, expected: Any, path: string): void {
  if (expected === null) {
    tt.equal(actual, null, `${path} is null`)
  } else if (Array.isArray(expected)) {
    tt.ok(Array.isArray(actual), `${path} is an array`)
    tt.equal(actual.length, expected.length, `${path} length`)
    expected.forEach((item: Any, i: number) => sameShape(tt, actual[i], item, `${path}[${i}]`))
  } else if (typeof expected === 'object') {
    tt.same(Object.keys(actual), Object.keys(expected), `${path} keys`)
    for (const key of Object.keys(expected)) sameShape(tt, actual[key], expected[key], `${path}.${key}`)
  } else {
    tt.equal(typeof actual, typeof expected, `${path} type`)
  }
}

t.test('health/connect answers in the captured shape', async (tt) => {
  // Default timing here, so Consul's own values are exercised too.
  const port = await closedPort()
  const { catalog } = harness(tt, { timing: undefined })
  catalog.register(native('api', 'api-1', { Check: { Name: 'api health', HTTP: `http://127.0.0.1:${port}/`, Interval: '10s' } }), false)
  const captured = JSON.parse(readFileSync(CAPTURED, 'utf8'))
  const actual = catalog.healthConnect('api', false) as Any[]
  sameShape(tt, actual, captured, '$')
  const [entry] = actual
  const [expected] = captured
  tt.same({ ...entry.Node, CreateIndex: 0, ModifyIndex: 0 }, { ...expected.Node, CreateIndex: 0, ModifyIndex: 0 }, 'node')
  tt.same({ ...entry.Checks[0], CreateIndex: 0, ModifyIndex: 0 }, { ...expected.Checks[0], CreateIndex: 0, ModifyIndex: 0 }, 'serfHealth')
  tt.same({ ...entry.Service, CreateIndex: 0, ModifyIndex: 0 }, { ...expected.Service, CreateIndex: 0, ModifyIndex: 0 }, 'service')
  // Current Consul records the check's Interval; 1.10 left it empty.
  tt.same({ ...entry.Checks[1], CreateIndex: 0, ModifyIndex: 0 }, { ...expected.Checks[1], Interval: '10s', CreateIndex: 0, ModifyIndex: 0 }, 'service check')
  tt.equal(entry.Service.CreateIndex, entry.Checks[1].CreateIndex, 'service and check written together')
  tt.ok(entry.Service.CreateIndex > entry.Node.CreateIndex)
})

t.test('agent service body, content hash and change notifications', async (tt) => {
  const { catalog, events, index } = harness(tt)
  tt.equal(catalog.service('web-1'), null, 'unknown ID')
  tt.equal(unknownServiceMessage('web-1'), 'unknown service ID: web-1')
  const before = index()
  catalog.register(native('web', 'web-1', { Meta: { z: '1', a: '2' } }), false)
  tt.same(events, ['services', 'health'])
  tt.equal(catalog.healthIndex(), before + 1, 'one index per registration')
  const first = catalog.service('web-1') as { body: Any, hash: string }
  tt.match(first.hash, /^[0-9a-f]{1,16}$/)
  tt.same(first.body, {
    ID: 'web-1',
    Service: 'web',
    Tags: [],
    Meta: { a: '2', z: '1' },
    Port: 8443,
    Address: '127.0.0.1',
    TaggedAddresses: { lan_ipv4: { Address: '127.0.0.1', Port: 8443 }, wan_ipv4: { Address: '127.0.0.1', Port: 8443 } },
    Weights: { Passing: 1, Warning: 1 },
    EnableTagOverride: false,
    ContentHash: first.hash,
    Connect: { Native: true },
    Datacenter: 'dc1'
  })
  tt.same(Object.keys(first.body.Meta), ['a', 'z'], 'maps are sorted like Go marshals them')
  const listed = { ...first.body }
  delete listed.ContentHash
  tt.same(catalog.services(), { 'web-1': listed }, 'no ContentHash in the list')

  catalog.register(native('web', 'web-1', { Meta: { z: '1', a: '2' } }), false)
  tt.same(events, ['services', 'health'], 'identical registration writes nothing')
  tt.equal(catalog.healthIndex(), before + 1)
  tt.equal(catalog.service('web-1')?.hash, first.hash, 'hash unchanged')

  catalog.register(native('web', 'web-1', { Tags: ['v2'], Meta: { z: '1', a: '2' } }), false)
  tt.same(events, ['services', 'health', 'services', 'health'])
  const second = catalog.service('web-1') as { body: Any, hash: string }
  tt.not(second.hash, first.hash, 'hash follows the content')
  tt.same(second.body.Tags, ['v2'])
  tt.equal(second.body.ContentHash, second.hash)
  const health = (catalog.healthConnect('web', false) as Any[])[0]
  tt.equal(health.Service.CreateIndex, before + 1)
  tt.equal(health.Service.ModifyIndex, catalog.healthIndex())

  catalog.register(native('other', 'b-1', { Weights: { Passing: 3 } }), false)
  tt.same((catalog.service('b-1')?.body as Any).Weights, { Passing: 3, Warning: 0 }, 'given weights as given')
  tt.same(Object.keys(catalog.services()), ['b-1', 'web-1'], 'sorted by ID')
})

t.test('decoding follows Go: unknown fields, types, case and aliases', async (tt) => {
  const { catalog } = harness(tt)
  const rejects = (body: unknown, statusCode: number, message: string): void => {
    tt.throws(() => catalog.register(body, false), { statusCode, message }, message)
  }
  const decode = (body: unknown, message: string): void => rejects(body, 400, `Request decode failed: ${message}`)
  decode(undefined, 'EOF')
  rejects(null, 400, 'Missing service name')
  decode(5, 'json: cannot unmarshal number into Go value of type structs.ServiceDefinition')
  decode([], 'json: cannot unmarshal array into Go value of type structs.ServiceDefinition')
  decode({ Name: 'a', Foo: 1 }, 'json: unknown field "Foo"')
  decode({ Name: 'a', Namespace: 'default' }, 'json: unknown field "Namespace"')
  decode({ Name: 'a', Partition: 'default' }, 'json: unknown field "Partition"')
  decode({ Foo: 1, Bar: 2, Name: 'a' }, 'json: unknown field "Foo"')
  decode({ Name: 5 }, 'json: cannot unmarshal number into Go struct field ServiceDefinition.Name of type string')
  decode({ Name: {} }, 'json: cannot unmarshal object into Go struct field ServiceDefinition.Name of type string')
  decode({ Name: 'a', Port: 1.5, ID: 3 }, 'json: cannot unmarshal number 1.5 into Go struct field ServiceDefinition.Port of type int')
  decode({ Name: 'a', Port: '80' }, 'json: cannot unmarshal string into Go struct field ServiceDefinition.Port of type int')
  decode({ Name: 'a', EnableTagOverride: 'yes' }, 'json: cannot unmarshal string into Go struct field ServiceDefinition.EnableTagOverride of type bool')
  decode({ Name: 'a', Tags: 'x' }, 'json: cannot unmarshal string into Go struct field ServiceDefinition.Tags of type []string')
  decode({ Name: 'a', Tags: [true] }, 'json: cannot unmarshal bool into Go struct field ServiceDefinition.Tags of type string')
  decode({ Name: 'a', Meta: [] }, 'json: cannot unmarshal array into Go struct field ServiceDefinition.Meta of type map[string]string')
  decode({ Name: 'a', Weights: 1 }, 'json: cannot unmarshal number into Go struct field ServiceDefinition.Weights of type structs.Weights')
  decode({ Name: 'a', Weights: { Passing: 1, Bogus: 2 } }, 'json: unknown field "Bogus"')
  decode({ Name: 'a', TaggedAddresses: { lan: { Address: 'x', Extra: 1 } } }, 'json: unknown field "Extra"')
  decode({ Name: 'a', Check: 'x' }, 'json: cannot unmarshal string into Go value of type structs.CheckType')
  decode({ Name: 'a', Check: { TTL: '1s', Bogus: 1 } }, 'json: unknown field "Bogus"')
  decode({ Name: 'a', Checks: [{ TTL: '1s', Header: { X: 'y' } }] }, 'json: cannot unmarshal string into Go struct field CheckType.Header of type []string')
  // A nested type with its own UnmarshalJSON ends the decode, ahead of an earlier saved error.
  decode({ Foo: 1, Check: { Bar: 1 } }, 'json: unknown field "Bar"')
  decode({ Name: 'a', Proxy: { Upstreams: [{ DestinationName: 'db', Nope: 1 }] } }, 'json: unknown field "Nope"')
  decode({ Name: 'a', Proxy: { Expose: { Paths: [{ Path: '/x', Nope: 1 }] } } }, 'json: unknown field "Nope"')
  decode({ Name: 'a', Proxy: { transparent_proxy: { outbound_listener_port: 1 } } }, 'json: unknown field "outbound_listener_port"')
  decode({ Name: 'a', Connect: { SidecarService: { Bogus: 1 } } }, 'json: unknown field "Bogus"')

  // Durations: Go's messages, quoting included.
  const duration = (value: unknown, message: string): void => decode({ Name: 'a', Check: { TTL: value } }, message)
  duration('abc', 'time: invalid duration "abc"')
  duration('', 'time: invalid duration ""')
  duration('.s', 'time: invalid duration ".s"')
  duration('5', 'time: missing unit in duration "5"')
  duration('5x', 'time: unknown unit "x" in duration "5x"')
  duration('5é', 'time: unknown unit "\\xc3\\xa9" in duration "5\\xc3\\xa9"')
  duration('1"\\', 'time: unknown unit "\\"\\\\" in duration "1\\"\\\\"')
  duration('9999999999999999999h', 'time: invalid duration "9999999999999999999h"')
  duration('2562047h2562047h', 'time: invalid duration "2562047h2562047h"')
  duration('9223372036854775808ns', 'time: invalid duration "9223372036854775808ns"')
  rejects({ Name: 'a', Check: { TTL: '-9223372036854775808ns' } }, 400, 'Invalid check: TTL must be > 0 for TTL checks')

  // Case-insensitive names (Unicode simple folding included), snake_case aliases, nulls, and
  // unknown keys inside Connect, which Consul decodes leniently.
  catalog.register({
    name: 'fold',
    iD: 'fold-1',
    // U+212A KELVIN SIGN and U+017F LATIN SMALL LETTER LONG S fold to k and s in Go.
    Kind: '',
    ſocketPath: '/run/fold.sock',
    TAGS: [null, 'b'],
    Meta: { a: null },
    Port: null,
    tagged_addresses: { lan: { address: '10.0.0.1', PORT: 1 }, x: null },
    EnableTagOverride: true,
    enable_tag_override: false,
    connect: { native: true, bogus: 1, PeerMeta: { SNI: ['a'], Extra: 1 } },
    Check: { Notes: '', OutputMaxSize: 0, TLSSkipVerify: false, Header: {}, Interval: '0s' },
    Checks: [{ ttl: '1s', deregister_critical_service_after: '2m', DeregisterCriticalServiceAfter: '3m', ServiceID: 'x', service_id: 'y', tls_skip_verify: true, Header: { X: null } }]
  }, false)
  const fold = (catalog.healthConnect('fold', false) as Any[])[0]
  tt.same(fold.Service.Tags, ['', 'b'])
  tt.same(fold.Service.Meta, { a: '' })
  tt.equal(fold.Service.SocketPath, '/run/fold.sock')
  tt.notOk('Port' in fold.Service, 'Port omitted when 0')
  tt.same(fold.Service.TaggedAddresses, { lan: { Address: '10.0.0.1', Port: 1 }, x: { Address: '', Port: 0 } })
  tt.equal(fold.Service.EnableTagOverride, true)
  tt.same(fold.Checks.map((c: Any) => c.CheckID), ['serfHealth', 'service:fold-1'], 'an empty Check is ignored')
  tt.equal(fold.Checks[1].Type, 'ttl')

  rejects({ Name: 'a', Checks: [null] }, 400, 'Invalid check: TTL must be > 0 for TTL checks')
  catalog.register({ Name: 'snake', Port: 1, Connect: { Native: true }, enable_tag_override: true, Check: { ServiceID: 'ignored' } }, false)
  const snake = (catalog.healthConnect('snake', false) as Any[])[0]
  tt.equal(snake.Service.EnableTagOverride, true, 'the alias fills an empty field')
  tt.equal(snake.Checks.length, 1, 'a Check with only ignored fields is empty')
  tt.notOk('TaggedAddresses' in snake.Service, 'no address, no tagged addresses')
})

t.test('registration rules and messages', async (tt) => {
  const { catalog, events } = harness(tt)
  const rejects = (body: Record<string, unknown>, statusCode: number, message: string): void => {
    tt.throws(() => catalog.register({ Name: 'svc', ...body }, false), { statusCode, message }, message)
  }
  const invalid = (body: Record<string, unknown>, message: string): void => rejects(body, 400, message)
  rejects({ Name: '' }, 400, 'Missing service name')
  for (const Address of ['0.0.0.0', '::', '[::]']) invalid({ Address }, 'Invalid service address')
  invalid({ Weights: {} }, 'Invalid Weights: Passing must be greater than 0')
  invalid({ Weights: { Passing: 1, Warning: -1 } }, 'Invalid Weights: Warning must be greater or equal than 0')
  invalid({ Weights: { Passing: 70000 } }, 'Invalid Weights: DNS Weight must be between 0 and 65535')
  invalid({ Weights: { Passing: 1, Warning: 70000 } }, 'Invalid Weights: DNS Weight must be between 0 and 65535')
  invalid({ Meta: Object.fromEntries(Array.from({ length: 65 }, (_, i) => [`k${i}`, 'v'])) },
    'Invalid Service Meta: Node metadata cannot contain more than 64 key/value pairs')
  const meta = (key: string, value: string, problem: string): void =>
    invalid({ Meta: { ok: 'fine', [key]: value } }, `Invalid Service Meta: Couldn't load metadata pair ('${key}', '${value}'): ${problem}`)
  meta('', 'x', 'Key cannot be blank')
  meta('a b', 'x', 'Key contains invalid characters')
  meta('k'.repeat(129), 'x', 'Key is too long (limit: 128 characters)')
  meta('consul-x', 'x', "Key prefix 'consul-' is reserved for internal use")
  meta('big', 'v'.repeat(513), 'Value is too long (limit: 512 characters)')
  meta('wide', 'é'.repeat(257), 'Value is too long (limit: 512 characters)')

  invalid({ Connect: { Native: true } },
    'Validation failed: 1 error occurred:\n\t* Port or SocketPath must be set for a Connect native service.\n\n')
  invalid({ Kind: 'connect-proxy', Connect: { Native: true }, Proxy: { DestinationServiceName: ' ' } },
    'Validation failed: 4 errors occurred:\n' +
    '\t* Port or SocketPath must be set for a connect-proxy\n' +
    '\t* Proxy.DestinationServiceName must be non-empty for Connect proxy services\n' +
    '\t* A Proxy cannot also be Connect Native, only typical services\n' +
    '\t* Port or SocketPath must be set for a Connect native service.\n\n')
  invalid({ Kind: 'connect-proxy', Port: 1, Proxy: { DestinationServiceName: '*' } },
    'Validation failed: 1 error occurred:\n\t* Proxy.DestinationServiceName must not be a wildcard for Connect proxy services\n\n')
  invalid({ Kind: 'mesh-gateway' }, 'Validation failed: 1 error occurred:\n\t* Port must be non-zero for a mesh-gateway\n\n')

  const check = (c: Record<string, unknown>, problem: string): void => invalid({ Check: c }, `Invalid check: ${problem}`)
  check({ TTL: '1s', Interval: '1s' }, 'Interval and TTL cannot both be specified')
  check({ HTTP: 'http://x' }, 'Interval must be > 0 for Script, HTTP, H2PING, TCP, UDP or OSService checks')
  check({ HTTP: 'http://x', Interval: '1s', AliasService: 'a' }, 'Interval cannot be set for Alias checks')
  check({ AliasNode: 'n', TTL: '1s' }, 'TTL must be not be set for Alias checks')
  check({ Notes: 'x' }, 'TTL must be > 0 for TTL checks')
  check({ TTL: '1s', OutputMaxSize: -1 }, 'MaxOutputMaxSize must be positive')
  check({ TTL: '1s', FailuresBeforeWarning: 2, FailuresBeforeCritical: 1 }, "FailuresBeforeWarning can't be higher than FailuresBeforeCritical")
  invalid({ Checks: [{ TTL: '1s' }, { TTL: '1s', Status: 'maintenance' }] }, "Status for checks must 'passing', 'warning', 'critical'")
  const sidecar = 'Invalid SidecarService: the dev agent runs no sidecar proxies; register the service as Connect native'
  invalid({ Connect: { SidecarService: {} } }, sidecar)
  invalid({ Connect: { sidecar_service: { Port: 1 } } }, sidecar)
  rejects({ TaggedAddresses: { lan_ipv4: { Address: 'host' } } }, 500, 'Service tagged address "lan_ipv4" must be a valid ipv4 address')
  rejects({ TaggedAddresses: { wan_ipv4: { Address: '::1' } } }, 500, 'Service tagged address "wan_ipv4" must be a valid ipv4 address')
  rejects({ TaggedAddresses: { lan_ipv6: { Address: '10.0.0.1' } } }, 500, 'Service tagged address "lan_ipv6" must be a valid ipv6 address')
  const scripts = "Scripts are disabled on this agent from remote calls; to enable, configure 'enable_script_checks' to true"
  rejects({ Check: { Args: ['/bin/true'], Interval: '1s' } }, 500, scripts)
  rejects({ Check: { script_args: ['true'], DockerContainerID: 'c', Interval: '1s' } }, 500, scripts)
  const unsupported = 'Invalid check: the dev agent runs only HTTP, TCP and TTL checks'
  for (const c of [{ GRPC: '127.0.0.1:1', HTTP: 'http://x', Interval: '1s' }, { UDP: '127.0.0.1:1', Interval: '1s' }, { H2PING: 'x:1', Interval: '1s' }, { AliasService: 'web' }, { OSService: 'sshd', Interval: '1s' }]) {
    invalid({ Check: c }, unsupported)
  }
  tt.same(events, [], 'nothing was registered')

  // What Consul accepts: its lan_ipv6-twice check never looks at wan_ipv6, and a mesh gateway may
  // carry its federation key.
  catalog.register({ Name: 'gw', Kind: 'mesh-gateway', Port: 443, Meta: { 'consul-wan-federation': '1' }, TaggedAddresses: { wan_ipv6: { Address: '10.0.0.1' }, lan_ipv4: { Address: '10.0.0.2', Port: 9 } }, Address: '10.0.0.3' }, false)
  const gw = catalog.service('gw')?.body as Any
  tt.same(gw.TaggedAddresses, {
    lan_ipv4: { Address: '10.0.0.2', Port: 9 }, wan_ipv4: { Address: '10.0.0.3', Port: 443 }, wan_ipv6: { Address: '10.0.0.1', Port: 0 }
  }, 'given tagged addresses kept, the rest defaulted')
  tt.same(gw.Proxy, { MeshGateway: {}, Expose: {} }, 'gateways show their proxy config')
  tt.equal(gw.Kind, 'mesh-gateway')
  tt.same(catalog.healthConnect('gw', false), [], 'a gateway is not a Connect instance of its name')
})

t.test('HTTP checks: status by code, Consul output, request details', async (tt) => {
  const { base, seen } = await httpServer(tt)
  const { catalog, until, check, status } = harness(tt)
  catalog.register(native('web', 'web-1', {
    Checks: [
      { HTTP: `${base}/ok`, Interval: '20ms' },
      { HTTP: `${base}/busy`, Interval: '20ms' },
      { HTTP: `${base}/fail`, Interval: '20ms', Status: 'passing' },
      { CheckID: 'post', Name: 'posted', Notes: 'n', HTTP: `${base}/echo`, Method: 'POST', Body: 'ping', Interval: '20ms', Timeout: '1s', Header: { 'X-Test': ['a', 'b'], 'user-agent': ['custom'], Accept: ['text/x'], Host: ['health.test', 'ignored'] } },
      { CheckID: 'no-host', HTTP: `${base}/ok`, Interval: '20ms', Header: { host: [] } }
    ]
  }), false)
  await until('statuses', () => status('web', 'service:web-1:1') === 'passing' && status('web', 'service:web-1:2') === 'warning' &&
    status('web', 'service:web-1:3') === 'critical' && status('web', 'post') === 'passing' && status('web', 'no-host') === 'passing')
  tt.equal(check('web', 'service:web-1:1').Output, `HTTP GET ${base}/ok: 200 OK Output: healthy`)
  tt.equal(check('web', 'service:web-1:2').Output, `HTTP GET ${base}/busy: 429 Too Many Requests Output: slow down`)
  tt.equal(check('web', 'service:web-1:3').Output, `HTTP GET ${base}/fail: 500 Internal Server Error Output: boom`)
  const post = check('web', 'post')
  tt.match(post, { Name: 'posted', Notes: 'n', Type: 'http', Interval: '20ms', Timeout: '1s', Output: `HTTP POST ${base}/echo: 200 OK Output: POST ping` })
  tt.equal(check('web', 'service:web-1:1').Name, "Service 'web' check")
  const ok = seen.find((r) => r.url === '/ok') as Seen
  tt.equal(ok.method, 'GET')
  tt.equal(ok.headers['user-agent'], 'Consul Health Check')
  tt.equal(ok.headers.accept, 'text/plain, text/*, */*')
  tt.equal(ok.headers.connection, 'close', 'no keep-alive')
  const echo = seen.find((r) => r.url === '/echo') as Seen
  tt.match(echo, { method: 'POST', body: 'ping' })
  tt.match(echo.headers, { 'x-test': 'a, b', 'user-agent': 'custom', accept: 'text/x', host: 'health.test' })
})

t.test('HTTP check failures and redirects', async (tt) => {
  const { base, seen, server } = await httpServer(tt)
  const port = await closedPort()
  const { catalog, until, check } = harness(tt)
  const c = (CheckID: string, HTTP: string, extra: Record<string, unknown> = {}): Record<string, unknown> =>
    ({ CheckID, HTTP, Interval: '20ms', Timeout: '2s', ...extra })
  catalog.register(native('web', 'web-1', {
    Checks: [
      c('refused', `http://127.0.0.1:${port}/health`, { Status: 'passing' }),
      // Default ports on the IPv6 loopback: refused, or unreachable without IPv6; a failure either way.
      c('default-port', 'http://[::1]/health', { Status: 'passing' }),
      c('default-port-tls', 'https://[::1]/health', { Status: 'passing' }),
      c('bad-url', 'not a url', { Status: 'passing' }),
      c('scheme', 'ftp://127.0.0.1/x', { Status: 'passing' }),
      c('slow', `${base}/slow`, { Status: 'passing', Timeout: '100ms' }),
      c('stall', `${base}/stall`, { Timeout: '200ms' }),
      c('redirect', `${base}/redirect`),
      c('post-redirect', `${base}/redirect`, { Method: 'POST', Body: 'x' }),
      c('see-other', `${base}/see-other`, { Method: 'PUT', Body: 'x' }),
      c('temporary', `${base}/temporary`, { Method: 'POST', Body: 'data' }),
      c('no-follow', `${base}/redirect`, { Status: 'passing', DisableRedirects: true }),
      c('no-location', `${base}/no-location`, { Status: 'passing' }),
      c('bad-location', `${base}/bad-location`, { Status: 'passing' }),
      c('loop', `${base}/loop`, { Status: 'passing' }),
      c('big', `${base}/big`, { OutputMaxSize: 10 }),
      c('big-default', `${base}/big`)
    ]
  }), false)
  server.on('slow', (req: http.IncomingMessage) => req.socket.on('error', () => {}))
  const output = (id: string): string => check('web', id).Output
  const all = ['refused', 'default-port', 'default-port-tls', 'bad-url', 'scheme', 'slow', 'no-follow', 'no-location', 'bad-location', 'loop']
  await until('failures', () => all.every((id) => check('web', id).Status === 'critical'))
  await until('passes', () => ['stall', 'redirect', 'post-redirect', 'see-other', 'temporary', 'big', 'big-default'].every((id) => check('web', id).Status === 'passing'))
  tt.equal(output('refused'), `Get "http://127.0.0.1:${port}/health": dial tcp 127.0.0.1:${port}: connect: connection refused`)
  tt.match(output('default-port'), /^Get "http:\/\/\[::1\]\/health": (dial tcp \[::1\]:80: connect: connection refused|\S)/)
  tt.match(output('default-port-tls'), /^Get "https:\/\/\[::1\]\/health": (dial tcp \[::1\]:443: connect: connection refused|\S)/)
  tt.equal(output('bad-url'), 'parse "not a url": invalid URL')
  tt.equal(output('scheme'), 'Get "ftp://127.0.0.1/x": unsupported protocol scheme "ftp"')
  tt.equal(output('slow'), `Get "${base}/slow": context deadline exceeded (Client.Timeout exceeded while awaiting headers)`)
  tt.equal(output('stall'), `HTTP GET ${base}/stall: 200 OK Output: partial`, 'a body cut short by the timeout still counts by its code')
  tt.equal(output('redirect'), `HTTP GET ${base}/redirect: 200 OK Output: healthy`, 'output names the first URL and method')
  tt.equal(output('post-redirect'), `HTTP POST ${base}/redirect: 200 OK Output: healthy`)
  tt.equal(output('see-other'), `HTTP PUT ${base}/see-other: 200 OK Output: GET `, '303 turns into a bodiless GET')
  tt.equal(output('temporary'), `HTTP POST ${base}/temporary: 200 OK Output: POST data`, '307 keeps method and body')
  tt.equal(output('no-follow'), `HTTP GET ${base}/redirect: 302 Found Output: `)
  tt.equal(output('no-location'), `HTTP GET ${base}/no-location: 302 Found Output: nowhere`)
  tt.equal(output('bad-location'), `Get "${base}/bad-location": Invalid URL`)
  tt.equal(output('loop'), `Get "${base}/loop": stopped after 10 redirects`)
  tt.equal(output('big'), `HTTP GET ${base}/big: 200 OK Output: 0123456789`, 'the last OutputMaxSize bytes')
  tt.equal(output('big-default'), `HTTP GET ${base}/big: 200 OK Output: ${'x'.repeat(4086)}0123456789`, '4 KiB by default')
  const afterPost = seen.findIndex((r) => r.url === '/redirect' && r.method === 'POST')
  tt.ok(seen.slice(afterPost).some((r) => r.url === '/ok' && r.method === 'GET' && r.body === ''), '302 after POST continues as GET')
})

t.test('HTTPS checks honour TLSSkipVerify and TLSServerName and send no client certificate', async (tt) => {
  const handshakes: Array<{ servername: string | false | null, clientCert: boolean }> = []
  const server = https.createServer({ cert: CERT, key: KEY, requestCert: true, rejectUnauthorized: false }, (req, res) => {
    const socket = req.socket as TLSSocket
    handshakes.push({ servername: socket.servername, clientCert: Object.keys(socket.getPeerCertificate()).length > 0 })
    res.end('secure')
  })
  server.listen(0, '127.0.0.1')
  await once(server, 'listening')
  tt.teardown(() => { server.closeAllConnections(); server.close() })
  const base = `https://127.0.0.1:${(server.address() as AddressInfo).port}`
  const { catalog, until, check } = harness(tt)
  catalog.register(native('web', 'web-1', {
    Checks: [
      { CheckID: 'skip', HTTP: `${base}/health`, Interval: '20ms', TLSSkipVerify: true, TLSServerName: 'health.test' },
      { CheckID: 'skip-no-sni', HTTP: `${base}/health`, Interval: '20ms', tls_skip_verify: true },
      { CheckID: 'verify', HTTP: `${base}/health`, Interval: '20ms', Status: 'passing' }
    ]
  }), false)
  await until('TLS results', () => check('web', 'skip').Status === 'passing' && check('web', 'skip-no-sni').Status === 'passing' &&
    check('web', 'verify').Status === 'critical')
  tt.equal(check('web', 'skip').Output, `HTTP GET ${base}/health: 200 OK Output: secure`)
  tt.match(check('web', 'verify').Output, new RegExp(`^Get "${base}/health": tls: failed to verify certificate: x509: self.signed certificate`))
  tt.ok(handshakes.some((h) => h.servername === 'health.test'), 'TLSServerName is sent as SNI')
  tt.ok(handshakes.some((h) => h.servername !== 'health.test'), 'no SNI for an IP otherwise')
  tt.ok(handshakes.every((h) => !h.clientCert), 'no client certificate presented')
})

t.test('TCP checks', async (tt) => {
  const listener = net.createServer((socket) => socket.end())
  listener.listen(0, '127.0.0.1')
  await once(listener, 'listening')
  const silent = new Set<net.Socket>()
  const quiet = net.createServer((socket) => { silent.add(socket); socket.on('error', () => {}) })
  quiet.listen(0, '127.0.0.1')
  await once(quiet, 'listening')
  const tlsServer = https.createServer({ cert: CERT, key: KEY }, (_req, res) => res.end())
  tlsServer.listen(0, '127.0.0.1')
  await once(tlsServer, 'listening')
  tt.teardown(() => {
    for (const socket of silent) socket.destroy()
    listener.close()
    quiet.close()
    tlsServer.closeAllConnections()
    tlsServer.close()
  })
  const open = `127.0.0.1:${(listener.address() as AddressInfo).port}`
  const quietAddress = `127.0.0.1:${(quiet.address() as AddressInfo).port}`
  const tlsAddress = `127.0.0.1:${(tlsServer.address() as AddressInfo).port}`
  const closed = `127.0.0.1:${await closedPort()}`
  const { catalog, until, check } = harness(tt)
  const c = (CheckID: string, TCP: string, extra: Record<string, unknown> = {}): Record<string, unknown> => ({ CheckID, TCP, Interval: '20ms', ...extra })
  catalog.register(native('db', 'db-1', {
    Checks: [
      c('open', open),
      c('closed', closed, { Status: 'passing' }),
      c('no-port', 'localhost', { Status: 'passing' }),
      c('bad-port', '127.0.0.1:99999', { Status: 'passing' }),
      c('ipv6', `[::1]:${closed.split(':')[1] as string}`, { Status: 'passing' }),
      c('tls', tlsAddress, { TCPUseTLS: true, TLSSkipVerify: true, TLSServerName: 'health.test' }),
      c('tls-verify', tlsAddress, { TCPUseTLS: true, Status: 'passing' }),
      c('tls-timeout', quietAddress, { TCPUseTLS: true, Timeout: '100ms', Status: 'passing' })
    ]
  }), false)
  await until('TCP results', () => check('db', 'open').Status === 'passing' && check('db', 'tls').Status === 'passing' &&
    ['closed', 'no-port', 'bad-port', 'ipv6', 'tls-verify', 'tls-timeout'].every((id) => check('db', id).Status === 'critical'))
  const output = (id: string): string => check('db', id).Output
  tt.equal(output('open'), `TCP connect ${open}: Success`)
  tt.equal(output('closed'), `dial tcp ${closed}: connect: connection refused`)
  tt.equal(output('no-port'), 'dial tcp: address localhost: missing port in address')
  tt.equal(output('bad-port'), 'dial tcp: address 127.0.0.1:99999: invalid port')
  tt.equal(output('tls'), `TCP+TLS connect ${tlsAddress}: Success`)
  tt.match(output('tls-verify'), /^tls: failed to verify certificate: x509: self.signed certificate/)
  tt.equal(output('tls-timeout'), `dial tcp ${quietAddress}: i/o timeout`)
  tt.equal(check('db', 'open').Type, 'tcp')
})

t.test('success and failure thresholds', async (tt) => {
  const { base } = await httpServer(tt)
  const { catalog, until, check, events } = harness(tt)
  catalog.register(native('web', 'web-1', {
    Checks: [
      // Fails once, then passes: the first pass is held back until a second one.
      { CheckID: 'settle', HTTP: `${base}/sequence/a/500/200`, Interval: '20ms', SuccessBeforePassing: 2 },
      // Passes, then fails for good: warning from the second failure, critical from the third.
      { CheckID: 'soft', HTTP: `${base}/sequence/b/200/500`, Interval: '20ms', FailuresBeforeWarning: 2, FailuresBeforeCritical: 3 }
    ]
  }), false)
  // Each check's status transitions, with the output at the moment of the change.
  const history = new Map<string, Array<[string, string]>>()
  const record = (): void => {
    for (const id of ['settle', 'soft']) {
      const list = history.get(id) ?? []
      const { Status, Output } = check('web', id)
      if (list.at(-1)?.[0] !== Status) list.push([Status, Output])
      history.set(id, list)
    }
  }
  record()
  await until('thresholds', () => { record(); return check('web', 'settle').Status === 'passing' && check('web', 'soft').Status === 'critical' })
  tt.same(history.get('settle')?.map(([s]) => s), ['critical', 'passing'])
  tt.match(history.get('settle')?.[1]?.[1], /Output: run 3$/, 'passing only after the second success')
  tt.same(history.get('soft')?.map(([s]) => s), ['critical', 'passing', 'warning', 'critical'], 'warning before critical')
  tt.match(history.get('soft')?.[2]?.[1], /Output: run 3$/, 'held after the first failure')
  tt.match(history.get('soft')?.[3]?.[1], /Output: run 4$/, 'critical from the third failure')
  tt.ok(events.length >= 4)
})

t.test('TTL checks', async (tt) => {
  const { catalog, until, check, events } = harness(tt)
  catalog.register(native('app', 'app-1', {
    Checks: [
      { CheckID: 'beat', TTL: '150ms', OutputMaxSize: 10 },
      { CheckID: 'lapse', TTL: '30ms', Status: 'passing', Interval: true, Timeout: -1_000_000_000 },
      { CheckID: 'web', HTTP: 'http://127.0.0.1:1/', Interval: '1h' }
    ]
  }), false)
  tt.match(check('app', 'lapse'), { Type: 'ttl', Interval: '', Timeout: '-1s' })
  await until('expiry without output', () => check('app', 'lapse').Status === 'critical')
  tt.equal(check('app', 'lapse').Output, 'TTL expired')

  const count = events.length
  catalog.updateCheck('beat', 'passing', 'all good')
  tt.match(check('app', 'beat'), { Status: 'passing', Output: 'all good' })
  tt.equal(events.length, count + 1)
  tt.equal(catalog.healthIndex(), check('app', 'beat').ModifyIndex)
  catalog.updateCheck('beat', 'passing', 'still good')
  tt.equal(events.length, count + 1, 'output-only changes wake nobody')
  tt.equal(check('app', 'beat').Output, 'still good')
  catalog.updateCheck('beat', 'warning', 'x'.repeat(20))
  tt.match(check('app', 'beat'), { Status: 'warning', Output: `${'x'.repeat(10)} ... (captured 10 of 20 bytes)` })
  catalog.updateCheck('beat', 'passing')
  tt.equal(check('app', 'beat').Output, '')
  catalog.updateCheck('beat', 'passing', 'last words')
  await until('expiry', () => check('app', 'beat').Status === 'critical')
  tt.equal(check('app', 'beat').Output, 'TTL expired (last output before timeout follows): last words')

  tt.throws(() => catalog.updateCheck('nope', 'passing'), { statusCode: 404, message: 'Unknown check ID "nope". Ensure that the check ID is passed, not the check name.' })
  tt.throws(() => catalog.updateCheck('web', 'passing'), { statusCode: 500, message: 'CheckID "web" does not have associated TTL' })
  tt.throws(() => catalog.updateCheck('beat', 'maintenance' as CheckStatus), { statusCode: 400, message: "Invalid check status: 'maintenance'" })
})

t.test('DeregisterCriticalServiceAfter reaps the service', async (tt) => {
  const { catalog, until, events } = harness(tt)
  catalog.register(native('app', 'doomed', { Check: { TTL: '20ms', DeregisterCriticalServiceAfter: '60ms' } }), false)
  catalog.register(native('app', 'kept', { Check: { TTL: '20ms', Status: 'passing' } }), false)
  catalog.register(native('app', 'fine', { Check: { TTL: '1h', deregister_critical_service_after: '1ms' } }), false)
  await until('reaped', () => catalog.service('doomed') === null)
  tt.same((catalog.healthConnect('app', false) as Any[]).map((e) => e.Service.ID), ['fine', 'kept'])
  tt.equal(events.filter((e) => e === 'services').length, 4, 'three registrations and one deregistration')
  tt.throws(() => catalog.updateCheck('service:doomed', 'passing'), { statusCode: 404, message: /^Unknown check ID/ }, 'its checks are gone')
})

t.test('Consul floors: minimum interval and deregister-critical delay', async (tt) => {
  const { base, hits } = await httpServer(tt)
  const { catalog, until, status } = harness(tt, { timing: { minCheckInterval: 60_000, minDeregisterCriticalAfter: 60_000, reapInterval: 5, maxFirstRunDelay: 1 } })
  catalog.register(native('app', 'app-1', { Checks: [{ HTTP: `${base}/floor`, Interval: '1ms' }, { TTL: '10ms', DeregisterCriticalServiceAfter: '1ms' }] }), false)
  await until('first run and TTL expiry', () => status('app', 'service:app-1:1') === 'passing' && status('app', 'service:app-1:2') === 'critical')
  tt.equal(hits.get('/floor'), 1, 'the next run waits for the minimum interval')
  tt.not(catalog.service('app-1'), null, 'not reaped before the minimum delay')
})

t.test('deregister stops the checks', async (tt) => {
  const { base, hits } = await httpServer(tt)
  const { catalog, until, status, events } = harness(tt)
  catalog.register(native('web', 'counted', { Check: { HTTP: `${base}/count/c`, Interval: '20ms' } }), false)
  // A sentinel whose status flips on every run makes time observable through onChange.
  catalog.register(native('web', 'sentinel', { Check: { HTTP: `${base}/toggle/s`, Interval: '20ms' } }), false)
  await until('first run', () => status('web', 'service:counted') === 'passing')
  tt.throws(() => catalog.deregister('web'), { statusCode: 404, message: 'Unknown service ID "web". Ensure that the service ID is passed, not the service name.' })
  catalog.deregister('counted')
  tt.same(events.slice(-2), ['services', 'health'])
  tt.equal(catalog.service('counted'), null)
  const flips = async (n: number): Promise<void> => {
    const target = events.length + n
    await until(`${n} sentinel flips`, () => events.length >= target)
  }
  await flips(1)
  const count = hits.get('/count/c')
  await flips(3)
  tt.equal(hits.get('/count/c'), count, 'no runs after deregistration')
  tt.same((catalog.healthConnect('web', false) as Any[]).map((e) => e.Service.ID), ['sentinel'])
})

t.test('close() stops every runner, in flight or not', async (tt) => {
  const { base, server } = await httpServer(tt)
  const silent = new Set<net.Socket>()
  const quiet = net.createServer((socket) => { silent.add(socket); quiet.emit('accepted') })
  quiet.listen(0, '127.0.0.1')
  await once(quiet, 'listening')
  tt.teardown(() => { for (const socket of silent) socket.destroy(); quiet.close() })
  const { catalog, events, check } = harness(tt)
  const slow = once(server, 'slow')
  const accepted = once(quiet, 'accepted')
  catalog.register(native('web', 'web-1', {
    Checks: [
      { CheckID: 'slow', HTTP: `${base}/slow`, Interval: '20ms', Timeout: '5s' },
      { CheckID: 'handshake', TCP: `127.0.0.1:${(quiet.address() as AddressInfo).port}`, TCPUseTLS: true, Interval: '20ms', Timeout: '5s' },
      { CheckID: 'ttl', TTL: '60ms', Status: 'passing' }
    ]
  }), false)
  const [req] = await slow as [http.IncomingMessage]
  await accepted
  const aborted = once(req.socket, 'close')
  catalog.updateCheck('ttl', 'passing', 'fresh')
  const count = events.length
  catalog.close()
  await aborted
  await settle()
  tt.equal(events.length, count, 'nothing changed after close')
  tt.equal(check('web', 'slow').Status, 'critical')
  // A second catalog is the clock: its TTL, armed later with the same length, expires after ours would have.
  const clock = harness(tt)
  clock.catalog.register(native('clock', 'clock-1', { Check: { TTL: '60ms', Status: 'passing' } }), false)
  await clock.until('the clock TTL', () => clock.status('clock', 'service:clock-1') === 'critical')
  tt.equal(check('web', 'ttl').Status, 'passing', 'the TTL timer was stopped')
  tt.equal(events.length, count)
  catalog.register(native('web', 'late', { Check: { HTTP: `${base}/slow`, Interval: '20ms' } }), false)
  catalog.updateCheck('ttl', 'warning')
  tt.equal(check('web', 'ttl').Status, 'warning', 'the TTL API still answers')
  catalog.close()
})

t.test('re-registration: kept status, replaced checks, moved and repeated IDs', async (tt) => {
  const { catalog, events, check } = harness(tt)
  const ttl = (CheckID: string, extra: Record<string, unknown> = {}): Record<string, unknown> => ({ CheckID, TTL: '1h', ...extra })
  catalog.register(native('app', 'app-1', { Checks: [ttl('a'), ttl('b')] }), false)
  catalog.updateCheck('a', 'passing', 'up')
  const a = check('app', 'a')
  const count = events.length
  catalog.register(native('app', 'app-1', { Checks: [ttl('a', { Status: 'critical' })] }), false)
  tt.equal(events.length, count, 'unchanged checks and service: no write')
  tt.match(check('app', 'a'), { Status: 'passing', Output: 'up', ModifyIndex: a.ModifyIndex }, 'status kept from before')
  tt.ok(check('app', 'b'), 'without replace-existing-checks, other checks stay')
  catalog.register(native('app', 'app-1', { Checks: [ttl('a', { Name: 'renamed' })] }), true)
  tt.same(events.slice(count), ['health'], 'a check change is not a service change')
  tt.equal(check('app', 'b'), undefined, 'replace-existing-checks removes the rest')
  tt.match(check('app', 'a'), { Name: 'renamed', CreateIndex: a.CreateIndex })
  tt.ok(check('app', 'a').ModifyIndex > a.ModifyIndex)
  catalog.register(native('app', 'app-1', { Checks: [ttl('a', { Name: 'renamed' })] }), true)
  tt.same(events.slice(count), ['health'], 'replacing with the same set writes nothing')

  catalog.register(native('app', 'app-2', { Checks: [ttl('a', { Name: 'moved' }), ttl('dup', { Name: 'first' }), ttl('dup', { Name: 'second' })] }), false)
  tt.equal(check('app', 'a').ServiceID, 'app-2', 'a check ID belongs to one service')
  tt.match(check('app', 'dup'), { Name: 'second' }, 'the last of repeated IDs wins')
  const app1 = (catalog.healthConnect('app', false) as Any[]).find((e) => e.Service.ID === 'app-1')
  tt.same(app1.Checks.map((c: Any) => c.CheckID), ['serfHealth'])
  catalog.updateCheck('dup', 'passing')
  tt.equal(check('app', 'dup').Status, 'passing', 'the surviving definition runs')
})

t.test('health/connect selection, order and the passing filter', async (tt) => {
  const { catalog } = harness(tt)
  const ttl = (Status: string): Record<string, unknown> => ({ TTL: '1h', Status })
  catalog.register(native('api', 'b-api', { Check: ttl('passing') }), false)
  catalog.register(native('API', 'A-api', { Checks: [{ CheckID: 'z', ...ttl('passing') }, { CheckID: 'Y', ...ttl('passing') }] }), false)
  catalog.register(native('api', 'c-warn', { Check: ttl('warning') }), false)
  catalog.register(native('api', 'd-crit', { Check: ttl('critical') }), false)
  catalog.register({ Name: 'api', ID: 'plain', Port: 80 }, false)
  catalog.register(native('other', 'other-1'), false)
  catalog.register({ Kind: 'connect-proxy', Name: 'api-sidecar-proxy', ID: 'e-proxy', Port: 21000, Proxy: { DestinationServiceName: 'api' } }, false)
  catalog.register({ Kind: 'connect-proxy', Name: 'x-proxy', ID: 'x-proxy', Port: 21001, Proxy: { DestinationServiceName: 'other' } }, false)
  const ids = (passing: boolean, name = 'api'): string[] => (catalog.healthConnect(name, passing) as Any[]).map((e) => e.Service.ID)
  tt.same(ids(false), ['A-api', 'b-api', 'c-warn', 'd-crit', 'e-proxy'], 'natives and proxies, by ID')
  tt.same(ids(true), ['A-api', 'b-api', 'e-proxy'], 'only instances whose checks all pass')
  tt.same(ids(false, 'Api'), ids(false), 'names compare case-insensitively')
  tt.same(ids(false, 'missing'), [])
  const a = (catalog.healthConnect('api', false) as Any[])[0]
  tt.same(a.Checks.map((c: Any) => c.CheckID), ['serfHealth', 'Y', 'z'])
  tt.equal(a.Service.Service, 'API')
})

t.test('health/service: every instance of the name; consul is the agent\'s own node, as a server', async (tt) => {
  const { catalog } = harness(tt)
  catalog.register({ Name: 'api', ID: 'plain', Port: 80 }, false)
  catalog.register(native('api', 'native-crit', { Check: { TTL: '1h', Status: 'critical' } }), false)
  catalog.register({ Kind: 'connect-proxy', Name: 'api-sidecar-proxy', ID: 'proxy', Port: 21000, Proxy: { DestinationServiceName: 'api' } }, false)
  const ids = (name: string, passing: boolean): string[] => (catalog.healthService(name, passing) as Any[]).map((e) => e.Service.ID)
  tt.same(ids('api', false), ['native-crit', 'plain'], 'by name, Connect-native or not; a proxy is its own service')
  tt.same(ids('API', true), ['plain'])
  const [server, ...others] = catalog.healthService('Consul', true) as Any[]
  tt.same(others, [])
  tt.match(server, {
    Node: { Node: 'vm', Datacenter: 'dc1' },
    Service: { ID: 'consul', Service: 'consul', Port: 8300, Tags: [], Connect: {} },
    Checks: [{ CheckID: 'serfHealth', Status: 'passing' }]
  })
})

t.test('proxy registrations render like Consul', async (tt) => {
  const { catalog } = harness(tt)
  catalog.register({
    kind: 'connect-proxy',
    name: 'api-sidecar-proxy',
    port: 21000,
    Locality: { Region: 'eu', Zone: '' },
    proxy: {
      destination_service_name: 'api',
      local_service_port: 8080,
      Mode: 'direct',
      Config: { z: 1, a: { c: [1], b: 2 } },
      upstreams: [{ destination_name: 'db', local_bind_port: 9000, Config: { b: 1, a: null } }, { DestinationType: 'prepared_query', DestinationName: 'q', LocalBindPort: 9001 }],
      expose: { Checks: true, Paths: [{ path: '/metrics', listener_port: 21500 }] },
      transparent_proxy: { OutboundListenerPort: 15001 },
      mesh_gateway: { Mode: 'local' },
      AccessLogs: { Enabled: true },
      EnvoyExtensions: [{ Name: 'ext', Arguments: { y: 1, x: 2 } }]
    }
  }, false)
  const health = (catalog.healthConnect('api', false) as Any[])[0].Service
  tt.equal(health.Kind, 'connect-proxy')
  tt.same(health.Locality, { Region: 'eu' })
  tt.same(health.Connect, {})
  tt.same(health.Proxy, {
    TransparentProxy: { OutboundListenerPort: 15001 },
    AccessLogs: { Enabled: true },
    EnvoyExtensions: [{ Arguments: { x: 2, y: 1 }, Name: 'ext' }],
    DestinationServiceName: 'api',
    LocalServicePort: 8080,
    Mode: 'direct',
    Config: { a: { b: 2, c: [1] }, z: 1 },
    Upstreams: [
      { DestinationType: 'service', DestinationName: 'db', Datacenter: '', LocalBindPort: 9000, Config: { a: null, b: 1 }, MeshGateway: {} },
      { DestinationType: 'prepared_query', DestinationName: 'q', Datacenter: '', LocalBindPort: 9001, MeshGateway: {} }
    ],
    MeshGateway: { Mode: 'local' },
    Expose: { Checks: true, Paths: [{ ListenerPort: 21500, Path: '/metrics' }] }
  })
  tt.same(Object.keys(health.Proxy.Config), ['a', 'z'])
  const agent = catalog.service('api-sidecar-proxy')?.body as Any
  tt.same(agent.Proxy.Upstreams[0], { DestinationType: 'service', DestinationName: 'db', LocalBindPort: 9000, Config: { a: null, b: 1 }, MeshGateway: {} })
  tt.equal(agent.Proxy.Mode, 'direct')
  tt.same(agent.Locality, { Region: 'eu' })
  tt.notOk('Connect' in agent)

  catalog.register({ Kind: 'connect-proxy', Name: 'bare', Port: 21001, Proxy: { DestinationServiceName: 'api' } }, false)
  tt.same((catalog.service('bare')?.body as Any).Proxy, { DestinationServiceName: 'api', MeshGateway: {}, Expose: {} }, 'empty Mode omitted in the agent view')
})

t.test('IPv6 node and service addresses, durations as Go prints them', async (tt) => {
  const { catalog, check } = harness(tt, { nodeAddress: '::1', nodeId: undefined })
  catalog.register(native('v6', 'v6-1', {
    Address: '::1',
    Checks: [
      { CheckID: 'h', TTL: '1h30m' },
      { CheckID: 'm', TTL: '90s', Timeout: '1.5s' },
      { CheckID: 'ms', TTL: '250ms', Timeout: '1.5ms' },
      { CheckID: 'us', TTL: '1s', Timeout: '250µs' },
      { CheckID: 'us2', TTL: '1s', Timeout: '2μs' },
      { CheckID: 'ns', TTL: '1s', Timeout: 100 },
      { CheckID: 'mixed', TTL: '+1h0m0.5s', Timeout: '0' },
      { CheckID: 'num', TTL: 1_500_000_000.7, Timeout: '.5h' }
    ]
  }), false)
  const entry = (catalog.healthConnect('v6', false) as Any[])[0]
  tt.match(entry.Node.ID, /^[0-9a-f-]{36}$/, 'a random node ID by default')
  tt.same(entry.Node.TaggedAddresses, { lan: '::1', lan_ipv6: '::1', wan: '::1', wan_ipv6: '::1' })
  tt.same(entry.Service.TaggedAddresses, { lan_ipv6: { Address: '::1', Port: 8443 }, wan_ipv6: { Address: '::1', Port: 8443 } })
  const shown = (id: string): [string, string] => [check('v6', id).Interval, check('v6', id).Timeout]
  tt.same(shown('h'), ['', ''], 'a TTL check has no interval')
  tt.equal(check('v6', 'm').Timeout, '1.5s')
  tt.equal(check('v6', 'ms').Timeout, '1.5ms')
  tt.equal(check('v6', 'us').Timeout, '250µs')
  tt.equal(check('v6', 'us2').Timeout, '2µs')
  tt.equal(check('v6', 'ns').Timeout, '100ns')
  tt.equal(check('v6', 'mixed').Timeout, '')
  tt.equal(check('v6', 'num').Timeout, '30m0s')
  catalog.register(native('v6', 'v6-2', { Checks: [{ HTTP: 'http://127.0.0.1:1/', Interval: '1h30m', Timeout: '90s' }, { TCP: '127.0.0.1:1', Interval: '3723.5s' }] }), false)
  tt.same([check('v6', 'service:v6-2:1').Interval, check('v6', 'service:v6-2:1').Timeout], ['1h30m0s', '1m30s'])
  tt.equal(check('v6', 'service:v6-2:2').Interval, '1h2m3.5s')
})
