#!/usr/bin/env node
'use strict'
// The package's command line (`fastify-consul-native dev-agent ...`); the code is the compiled
// lib/dev-agent/cli.ts, so run `npm run build` first when working from a checkout.
require('../dist/dev-agent/cli.js').run(process.argv.slice(2))
