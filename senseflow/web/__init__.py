"""The live page's assets (HTML, script, style sheet), served by senseflow.livepage."""
