import t from 'tap'
import { mkdirSync, mkdtempSync, symlinkSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { resolveAgentConfig } from '../lib/agent/config'
import type { AgentOptions } from '../lib/agent/config'
import { InvalidOptionError } from '../lib/errors'

const dir = mkdtempSync(join(tmpdir(), 'agent-config-'))
function file (name: string, content: string): string {
  const p = join(dir, name)
  writeFileSync(p, content)
  return p
}
const missing = join(dir, 'does-not-exist')

/** Asserts an InvalidOptionError for `name` whose message contains `text`. */
function throwsOption (tt: tap.Test, fn: () => unknown, name: string, text: string | RegExp): void {
  try {
    fn()
    tt.fail(`expected InvalidOptionError for ${name}`)
  } catch (err) {
    tt.ok(err instanceof InvalidOptionError, 'is an InvalidOptionError')
    tt.match((err as Error).message, `option ${name}: `)
    tt.match((err as Error).message, text)
  }
}

t.test('an unknown key is refused, not left to a variable or the default', async (t) => {
  throwsOption(t, () => resolveAgentConfig({ adress: 'consul:8500' } as never, {}), 'agent.adress', /is not an option \(known: address, token, .*worker\)/)
  throwsOption(t, () => resolveAgentConfig({ address: 'consul:8500', tlsServername: 'x' } as never, {}), 'agent.tlsServername', 'is not an option')
  t.equal(resolveAgentConfig({ address: 'https://consul:8501', token: 't', tlsServerName: 'consul', insecureSkipVerify: false, worker: true }, {}).origin,
    'https://consul:8501', 'documented keys pass')
})

t.test('defaults to plain HTTP on 127.0.0.1:8500 with no token', async (t) => {
  t.same(resolveAgentConfig(undefined, {}), {
    origin: 'http://127.0.0.1:8500', socketPath: null, tls: null, token: null, display: 'http://127.0.0.1:8500'
  })
  t.equal(resolveAgentConfig({}, { CONSUL_HTTP_ADDR: '', CONSUL_HTTP_TOKEN: '' }).origin, 'http://127.0.0.1:8500',
    'empty variables count as unset, like the consul CLI')
})

t.test('reads every CONSUL_HTTP_ADDR form', async (t) => {
  const cases: Array<[Record<string, string>, string, string | null, boolean]> = [
    [{ CONSUL_HTTP_ADDR: 'consul.test:8501' }, 'http://consul.test:8501', null, false],
    [{ CONSUL_HTTP_ADDR: 'http://10.0.0.1:8500' }, 'http://10.0.0.1:8500', null, false],
    [{ CONSUL_HTTP_ADDR: 'HTTP://10.0.0.1:8500/' }, 'http://10.0.0.1:8500', null, false],
    [{ CONSUL_HTTP_ADDR: 'https://consul.test:8501' }, 'https://consul.test:8501', null, true],
    [{ CONSUL_HTTP_ADDR: '[::1]:8500' }, 'http://[::1]:8500', null, false],
    [{ CONSUL_HTTP_ADDR: 'consul.test:8501', CONSUL_HTTP_SSL: 'true' }, 'https://consul.test:8501', null, true],
    [{ CONSUL_HTTP_ADDR: 'consul.test:8501', CONSUL_HTTP_SSL: '0' }, 'http://consul.test:8501', null, false],
    [{ CONSUL_HTTP_ADDR: 'http://consul.test:8500', CONSUL_HTTP_SSL: 'true' }, 'https://consul.test:8500', null, true],
    [{ CONSUL_HTTP_ADDR: 'http://consul.test:8500', CONSUL_HTTP_SSL: 'false' }, 'http://consul.test:8500', null, false],
    [{ CONSUL_HTTP_ADDR: 'unix:///var/run/consul.sock' }, 'http://localhost', '/var/run/consul.sock', false],
    [{ CONSUL_HTTP_ADDR: 'unix:///var/run/consul.sock', CONSUL_HTTP_SSL: 'T' }, 'https://localhost', '/var/run/consul.sock', true]
  ]
  for (const [env, origin, socketPath, https] of cases) {
    const c = resolveAgentConfig(undefined, env)
    t.equal(c.origin, origin, `${JSON.stringify(env)} → origin`)
    t.equal(c.socketPath, socketPath, `${JSON.stringify(env)} → socket`)
    t.equal(c.tls !== null, https, `${JSON.stringify(env)} → tls`)
  }
  t.equal(resolveAgentConfig(undefined, { CONSUL_HTTP_ADDR: 'unix:///s.sock' }).display, 'unix:///s.sock')
  t.equal(resolveAgentConfig({ address: 'http://consul.test:8500' }, { CONSUL_HTTP_SSL: 'true' }).origin, 'http://consul.test:8500',
    'CONSUL_HTTP_SSL never undoes an http:// in CONSUL_HTTP_ADDR (as the consul CLI), but an explicit option stays as written')
  t.equal(resolveAgentConfig({ address: 'consul.test:8501' }, { CONSUL_HTTP_SSL: 'true' }).origin, 'https://consul.test:8501')
})

t.test('explicit options win over the environment', async (t) => {
  const env = { CONSUL_HTTP_ADDR: 'consul.test:1', CONSUL_HTTP_TOKEN: 'from-env', CONSUL_TLS_SERVER_NAME: 'env.test', CONSUL_HTTP_SSL_VERIFY: 'false' }
  const c = resolveAgentConfig({ address: 'https://127.0.0.1:8501', token: 'from-option', tlsServerName: 'opt.test', insecureSkipVerify: false }, env)
  t.equal(c.origin, 'https://127.0.0.1:8501')
  t.equal(c.token, 'from-option')
  t.same(c.tls, { rejectUnauthorized: true, servername: 'opt.test' })
})

t.test('rejects an address that is not a URL, naming its source', async (t) => {
  throwsOption(t, () => resolveAgentConfig(undefined, { CONSUL_HTTP_ADDR: 'ht!tp://' }), 'agent.address',
    'CONSUL_HTTP_ADDR is not a URL: "ht!tp://"')
  t.equal(((): string => {
    try { resolveAgentConfig(undefined, { CONSUL_HTTP_ADDR: 'ht!tp://' }); return '' } catch (e) { return (e as Error).message }
  })(), 'Invalid fastify-consul-native option agent.address: CONSUL_HTTP_ADDR is not a URL: "ht!tp://"')
  throwsOption(t, () => resolveAgentConfig({ address: 'http://ht!tp:8500' }, {}), 'agent.address', 'the address is not a URL: "http://ht!tp:8500"')
  throwsOption(t, () => resolveAgentConfig({ address: 'consul.test:99999' }, {}), 'agent.address', 'not a URL')
  try {
    resolveAgentConfig({ address: 'a b:1' }, {})
  } catch (err) {
    t.ok((err as Error).cause instanceof TypeError, 'keeps the URL parser error as cause')
  }
  throwsOption(t, () => resolveAgentConfig({ address: 'ftp://consul.test' }, {}), 'agent.address', 'unsupported scheme "ftp"')
  throwsOption(t, () => resolveAgentConfig(undefined, { CONSUL_HTTP_ADDR: 'unix://' }), 'agent.address', 'CONSUL_HTTP_ADDR has no socket path')
  throwsOption(t, () => resolveAgentConfig({ address: 'http://consul.test:8500/v1' }, {}), 'agent.address', 'without credentials, path or query')
  throwsOption(t, () => resolveAgentConfig({ address: 'http://user:pw@consul.test:8500' }, {}), 'agent.address', 'without credentials')
  throwsOption(t, () => resolveAgentConfig({ address: 'consul.test:8500?x=1' }, {}), 'agent.address', 'without credentials, path or query')
  throwsOption(t, () => resolveAgentConfig({ address: '   ' }, {}), 'agent.address', 'the address is empty')
  throwsOption(t, () => resolveAgentConfig({ address: '' }, {}), 'agent.address', 'must be a non-empty string')
  throwsOption(t, () => resolveAgentConfig({ address: 8500 } as unknown as AgentOptions, {}), 'agent.address', 'must be a non-empty string')
})

t.test('rejects options that are not an object', async (t) => {
  throwsOption(t, () => resolveAgentConfig(null as unknown as AgentOptions, {}), 'agent', 'must be an object')
  throwsOption(t, () => resolveAgentConfig('consul:8500' as unknown as AgentOptions, {}), 'agent', 'must be an object')
  throwsOption(t, () => resolveAgentConfig([] as unknown as AgentOptions, {}), 'agent', 'must be an object')
})

t.test('boolean variables accept Go spellings only', async (t) => {
  throwsOption(t, () => resolveAgentConfig(undefined, { CONSUL_HTTP_SSL: 'yes' }), 'CONSUL_HTTP_SSL', 'CONSUL_HTTP_SSL must be true or false, got "yes"')
  throwsOption(t, () => resolveAgentConfig({ address: 'https://x:1' }, { CONSUL_HTTP_SSL_VERIFY: 'nope' }), 'CONSUL_HTTP_SSL_VERIFY',
    'CONSUL_HTTP_SSL_VERIFY must be true or false')
  for (const v of ['0', 'f', 'F', 'false', 'FALSE', 'False']) {
    t.equal(resolveAgentConfig({ address: 'https://x:1' }, { CONSUL_HTTP_SSL_VERIFY: v }).tls?.rejectUnauthorized, false, v)
  }
  for (const v of ['1', 't', 'T', 'true', 'TRUE', 'True']) {
    t.equal(resolveAgentConfig({ address: 'https://x:1' }, { CONSUL_HTTP_SSL_VERIFY: v }).tls?.rejectUnauthorized, true, v)
  }
})

t.test('tokens', async (t) => {
  t.equal(resolveAgentConfig(undefined, { CONSUL_HTTP_TOKEN: 'abc-123' }).token, 'abc-123')
  const tokenFile = file('token', '  file-token\n')
  t.equal(resolveAgentConfig({ tokenFile }, {}).token, 'file-token', 'a token file is read once and trimmed')
  t.equal(resolveAgentConfig(undefined, { CONSUL_HTTP_TOKEN_FILE: tokenFile, CONSUL_HTTP_TOKEN: 'env' }).token, 'file-token',
    'the token file wins over CONSUL_HTTP_TOKEN, as in the consul CLI')
  t.equal(resolveAgentConfig({ token: 'opt' }, { CONSUL_HTTP_TOKEN_FILE: tokenFile }).token, 'opt')
  throwsOption(t, () => resolveAgentConfig({ token: 'a', tokenFile }, {}), 'agent.token', 'not both')
  throwsOption(t, () => resolveAgentConfig({ token: '' }, {}), 'agent.token', 'must be a non-empty string')
  throwsOption(t, () => resolveAgentConfig({ tokenFile: 7 } as unknown as AgentOptions, {}), 'agent.tokenFile', 'must be a non-empty string')
  throwsOption(t, () => resolveAgentConfig({ token: 'two words' }, {}), 'agent.token', 'agent.token must be printable ASCII')
  throwsOption(t, () => resolveAgentConfig(undefined, { CONSUL_HTTP_TOKEN: 'bad\ttoken' }), 'agent.token', 'CONSUL_HTTP_TOKEN must be printable ASCII')
  throwsOption(t, () => resolveAgentConfig({ tokenFile: file('bad-token', 'a\nb') }, {}), 'agent.token',
    /the token in agent.tokenFile \(".*bad-token"\) must be printable ASCII/)
  const empty = file('empty-token', ' \n')
  t.equal(resolveAgentConfig({ tokenFile: empty }, {}).token, null, 'an empty token file is no token (consul CLI)')
  t.equal(resolveAgentConfig(undefined, { CONSUL_HTTP_TOKEN_FILE: empty, CONSUL_HTTP_TOKEN: 'env' }).token, 'env',
    'an empty CONSUL_HTTP_TOKEN_FILE gives way to CONSUL_HTTP_TOKEN, as in the consul CLI')
  t.equal(resolveAgentConfig({ tokenFile: empty }, { CONSUL_HTTP_TOKEN_FILE: tokenFile }).token, 'file-token', 'and so does an empty agent.tokenFile')
  throwsOption(t, () => resolveAgentConfig(undefined, { CONSUL_HTTP_TOKEN_FILE: missing }), 'agent.tokenFile',
    /cannot read CONSUL_HTTP_TOKEN_FILE \(".*does-not-exist"\): ENOENT/)
  try {
    resolveAgentConfig({ tokenFile: missing }, {})
  } catch (err) {
    t.equal(((err as Error).cause as NodeJS.ErrnoException).code, 'ENOENT', 'the fs error is the cause')
  }
  const c = resolveAgentConfig({ token: 'secret-token' }, {})
  t.notMatch(c.display, 'secret-token', 'display never shows the token')
})

t.test('TLS material from options, files and variables', async (t) => {
  const ca = file('ca.pem', 'CA PEM')
  const cert = file('cert.pem', 'CERT PEM')
  const key = file('key.pem', 'KEY PEM')
  t.same(resolveAgentConfig({ address: 'https://x:1', ca: 'inline-ca', cert: Buffer.from('c'), key: 'k' }, {}).tls,
    { rejectUnauthorized: true, ca: 'inline-ca', cert: Buffer.from('c'), key: 'k' })
  const fromFiles = resolveAgentConfig({ address: 'https://x:1', caFile: ca, certFile: cert, keyFile: key, tlsServerName: 'consul.test' }, {})
  t.equal(fromFiles.tls?.ca?.toString(), 'CA PEM')
  t.equal(fromFiles.tls?.cert?.toString(), 'CERT PEM')
  t.equal(fromFiles.tls?.key?.toString(), 'KEY PEM')
  t.equal(fromFiles.tls?.servername, 'consul.test')
  const fromEnv = resolveAgentConfig(undefined, {
    CONSUL_HTTP_ADDR: 'https://x:1', CONSUL_CACERT: ca, CONSUL_CLIENT_CERT: cert, CONSUL_CLIENT_KEY: key, CONSUL_TLS_SERVER_NAME: 'env.test'
  })
  t.equal(fromEnv.tls?.ca?.toString(), 'CA PEM')
  t.equal(fromEnv.tls?.servername, 'env.test')
  t.equal(resolveAgentConfig({ address: 'https://x:1', insecureSkipVerify: true }, {}).tls?.rejectUnauthorized, false)

  throwsOption(t, () => resolveAgentConfig({ address: 'https://x:1', ca: 'a', caFile: ca }, {}), 'agent.ca', 'either agent.ca or agent.caFile')
  throwsOption(t, () => resolveAgentConfig({ address: 'https://x:1', ca: '' }, {}), 'agent.ca', 'non-empty PEM string or Buffer')
  throwsOption(t, () => resolveAgentConfig({ address: 'https://x:1', ca: 42 } as unknown as AgentOptions, {}), 'agent.ca', 'non-empty PEM')
  throwsOption(t, () => resolveAgentConfig({ address: 'https://x:1', certFile: cert }, {}), 'agent.key', 'without its key')
  throwsOption(t, () => resolveAgentConfig({ address: 'https://x:1' }, { CONSUL_CLIENT_KEY: key }), 'agent.cert', 'without its certificate')
  throwsOption(t, () => resolveAgentConfig({ address: 'https://x:1', caFile: missing }, {}), 'agent.caFile', /cannot read agent.caFile \(".*"\): ENOENT/)
  throwsOption(t, () => resolveAgentConfig({ address: 'https://x:1' }, { CONSUL_CACERT: missing }), 'agent.caFile', 'cannot read CONSUL_CACERT')
  throwsOption(t, () => resolveAgentConfig({ address: 'https://x:1', insecureSkipVerify: 'yes' } as unknown as AgentOptions, {}),
    'agent.insecureSkipVerify', 'must be a boolean')
  throwsOption(t, () => resolveAgentConfig({ address: 'https://x:1', tlsServerName: '' }, {}), 'agent.tlsServerName', 'non-empty string')
})

t.test('a server name with a port is used without it, as the consul CLI does', async (t) => {
  const name = (tlsServerName: string): string | undefined => resolveAgentConfig({ address: 'https://x:1', tlsServerName }, {}).tls?.servername
  t.equal(resolveAgentConfig(undefined, { CONSUL_HTTP_ADDR: 'https://x:1', CONSUL_TLS_SERVER_NAME: 'consul.example:8501' }).tls?.servername, 'consul.example')
  t.equal(name('consul.example:8501'), 'consul.example')
  t.equal(name('consul.example'), 'consul.example')
  t.equal(name('[::1]:8501'), '::1')
  t.equal(name('[::1]'), '::1', 'brackets dropped: Node checks an IP against the IP SANs')
  t.equal(name('fe80::1'), 'fe80::1', 'a bare IPv6 literal has no port')
})

t.test('caPath and CONSUL_CAPATH: every PEM file of a directory, recursively; a CA file wins', async (t) => {
  const caDir = mkdtempSync(join(dir, 'capath-'))
  writeFileSync(join(caDir, 'b.pem'), '-----BEGIN CERTIFICATE-----\nB\n-----END CERTIFICATE-----\n')
  mkdirSync(join(caDir, 'sub'))
  writeFileSync(join(caDir, 'sub', 'a.crt'), '-----BEGIN CERTIFICATE-----\nA\n-----END CERTIFICATE-----')
  const both = resolveAgentConfig({ address: 'https://x:1', caPath: caDir }, {}).tls?.ca?.toString()
  t.match(both, /^-----BEGIN CERTIFICATE-----\nB\n[^]*-----BEGIN CERTIFICATE-----\nA\n/, 'files in name order, subdirectories walked')
  t.equal(resolveAgentConfig(undefined, { CONSUL_HTTP_ADDR: 'https://x:1', CONSUL_CAPATH: caDir }).tls?.ca?.toString(), both)
  const caFile = file('ca-wins.pem', 'CA PEM')
  t.equal(resolveAgentConfig(undefined, { CONSUL_HTTP_ADDR: 'https://x:1', CONSUL_CACERT: caFile, CONSUL_CAPATH: caDir }).tls?.ca?.toString(), 'CA PEM',
    'CONSUL_CACERT wins over CONSUL_CAPATH')
  t.equal(resolveAgentConfig({ address: 'https://x:1', caPath: caDir }, { CONSUL_CACERT: caFile }).tls?.ca?.toString(), both, 'the option wins over the variables')
  throwsOption(t, () => resolveAgentConfig({ address: 'https://x:1', caPath: caDir, caFile }, {}), 'agent.caPath', 'not agent.caFile and agent.caPath')
  throwsOption(t, () => resolveAgentConfig({ address: 'https://x:1', caPath: caDir, ca: 'pem' }, {}), 'agent.caPath', 'not agent.ca and agent.caPath')
  throwsOption(t, () => resolveAgentConfig({ address: 'https://x:1', caPath: missing }, {}), 'agent.caPath', /cannot read agent.caPath \(".*does-not-exist"\): ENOENT/)
  throwsOption(t, () => resolveAgentConfig({ address: 'https://x:1', caPath: caFile }, {}), 'agent.caPath', 'is not a directory holding PEM certificates')
  const emptyDir = mkdtempSync(join(dir, 'capath-empty-'))
  throwsOption(t, () => resolveAgentConfig(undefined, { CONSUL_HTTP_ADDR: 'https://x:1', CONSUL_CAPATH: emptyDir }), 'agent.caPath', /CONSUL_CAPATH \(".*"\) is not a directory holding PEM/)
  const junkDir = mkdtempSync(join(dir, 'capath-junk-'))
  writeFileSync(join(junkDir, 'README'), 'not a certificate')
  throwsOption(t, () => resolveAgentConfig({ address: 'https://x:1', caPath: junkDir }, {}), 'agent.caPath', /README in agent.caPath \(".*"\) holds no PEM certificate/)
  symlinkSync(caDir, join(caDir, 'sub', 'loop'))
  t.equal(resolveAgentConfig({ address: 'https://x:1', caPath: caDir }, {}).tls?.ca?.toString(), both, 'a link back up the tree is read once')
  const danglingDir = mkdtempSync(join(dir, 'capath-dangling-'))
  symlinkSync(missing, join(danglingDir, 'gone.pem'))
  throwsOption(t, () => resolveAgentConfig({ address: 'https://x:1', caPath: danglingDir }, {}), 'agent.caPath', /cannot read .*gone\.pem in agent.caPath/)
  throwsOption(t, () => resolveAgentConfig({ address: 'http://x:1', caPath: caDir }, {}), 'agent.caPath', 'only applies to an HTTPS agent')
  t.equal(resolveAgentConfig(undefined, { CONSUL_CAPATH: missing }).tls, null, 'not read for a plain-HTTP agent')
})

t.test('TLS options on a plain-HTTP address are a mistake; TLS variables are ignored there', async (t) => {
  throwsOption(t, () => resolveAgentConfig({ address: 'http://x:1', ca: 'pem' }, {}), 'agent.ca', 'only applies to an HTTPS agent, but the address is http://x:1')
  throwsOption(t, () => resolveAgentConfig({ insecureSkipVerify: true }, {}), 'agent.insecureSkipVerify', 'only applies to an HTTPS agent')
  const c = resolveAgentConfig(undefined, { CONSUL_CACERT: missing, CONSUL_CLIENT_CERT: missing, CONSUL_HTTP_SSL_VERIFY: 'false' })
  t.equal(c.tls, null, 'no TLS, and the missing files are never read')
})
