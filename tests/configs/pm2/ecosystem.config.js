// An Express/Next.js-style ecosystem file, shaped as PM2's documentation writes one:
// a web cluster on every CPU with production settings, and a background worker.
// Read by tests/unit/test_pm2_import.py and started by tests/integration/test_pm2_files.py.
const path = require('path');

const isProd = process.env.NODE_ENV === 'production';

module.exports = {
  apps: [
    {
      name: 'web',
      script: '../../apps/node_hello.js',
      instances: 'max',
      exec_mode: 'cluster',
      max_memory_restart: '300M',
      node_args: '--max-old-space-size=256',
      env: {
        NODE_ENV: 'development',
        PORT: process.env.WEB_PORT || 3000,
      },
      env_production: {
        NODE_ENV: 'production',
        API_URL: 'https://api.example.com',
      },
      log_date_format: 'YYYY-MM-DD HH:mm:ss Z',
      merge_logs: true,
      kill_timeout: 3000,
      listen_timeout: 8000,
    },
    {
      name: 'queue',
      script: path.join(__dirname, '../../apps/idle.py'),
      interpreter: 'python3',
      args: '--queue default',
      autorestart: true,
      max_restarts: 10,
      min_uptime: '5s',
      restart_delay: 1000,
      log_date_format: 'YYYY-MM-DD HH:mm:ss Z',
      env_production: {
        QUEUE_CONCURRENCY: isProd ? 8 : 2,
      },
    },
  ],
};
